"""``keepcount verify``: Jepsen-style fault-injection runs and their checkers (DESIGN §8).

A run drives increments and reads through the load balancer while a nemesis
kills, pauses and restarts processes, and records every operation as a
*history* (``history``: invoke, then ok / fail / info).  The checkers
(``checker``) are pure functions of that history that judge it valid
true / false / unknown.

Modules (one per concept):

- ``history``: ``Op``, the JSON-lines file format, ``HistoryWriter``, ``read_history``.
- ``checker``: ``counter``, ``exactly_once``, ``monotonic``, ``availability``,
  ``compose`` and ``check`` (the front door of the checker modules:
  ``analysis``, ``counter``, ``monotonic``, ``availability``, ``verdict``).
- ``workload``: the clients that record the history; ``nemesis``: the faults;
  ``run``: one whole run; ``report``: its report.
"""
