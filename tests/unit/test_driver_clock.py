"""The Cassandra driver's waits run on the monotonic clock (``driver_clock``).

No server needed: the driver's request timer and its scheduler's deadlines
are plain objects.  Without ``use_monotonic_clock`` they are in
``time.time()`` terms (about 1.8e9 s), with it in ``time.monotonic()``
terms, so a wall clock step no longer moves them.
"""

from __future__ import annotations

import time

from keepcount.stores.cassandra.driver_clock import MONOTONIC, use_monotonic_clock


def test_the_drivers_request_timers_count_on_the_monotonic_clock() -> None:
    from cassandra import cluster, connection, pool

    use_monotonic_clock()
    timer = connection.Timer(2.0, lambda: None)
    assert abs(timer.end - (time.monotonic() + 2.0)) < 1.0, (timer.end, time.monotonic())
    assert abs(time.time() - time.monotonic()) > 1000  # the clocks really differ here
    assert connection.time is MONOTONIC and pool.time is MONOTONIC and cluster.time is MONOTONIC
    assert cluster.ControlConnection._time is MONOTONIC
    assert MONOTONIC.sleep is time.sleep  # the rest of ``time`` is the real one


def test_use_monotonic_clock_is_idempotent() -> None:
    use_monotonic_clock()
    use_monotonic_clock()
    from cassandra import connection

    assert connection.time.time is time.monotonic
