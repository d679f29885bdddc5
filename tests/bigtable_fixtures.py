"""Fixtures for tests against the Cloud Bigtable emulator.

``bigtable_emulator``: one emulator per test session (it starts in well
under a second), SIGKILLed at the end.  A test takes it through
``bigtable_up`` (the same emulator, with its log tail printed at teardown,
which pytest shows only for a failing test, and started again if the test
killed it), or through ``bigtable_table`` / ``bigtable_url`` (a fresh,
uuid-named table that the code under test creates itself; deleted
afterwards, so the emulator's memory does not grow over a session).

The emulator keeps its data in memory only: a test that restores after a
crash kills keepcount nodes, never the emulator.  A missing emulator fails
the test (never skips) with the command that installs it.  A test module
takes the fixtures by assigning them to module-level names
(``bigtable_up = bigtable_fixtures.bigtable_up``); to share one emulator
between modules, import them into ``conftest.py`` instead (each module that
defines a session fixture gets an instance of its own).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from keepcount.cluster.bigtable import INSTANCE, PROJECT, BigtableEmulator, emulator_binary


def require_emulator() -> None:
    """Fail (never skip) with the install command if the emulator is missing."""
    try:
        emulator_binary()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def bigtable_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigtableEmulator]:
    require_emulator()
    emulator = BigtableEmulator(tmp_path_factory.mktemp("bigtable"))
    try:
        emulator.start()
        yield emulator
    finally:
        emulator.kill()


@pytest.fixture
def bigtable_up(bigtable_emulator: BigtableEmulator) -> Iterator[BigtableEmulator]:
    """The session's emulator for one test; running again afterwards."""
    yield bigtable_emulator
    print(f"\n{bigtable_emulator.logs(2000)}")
    if not bigtable_emulator.running():
        bigtable_emulator.start()


@pytest.fixture
def bigtable_table(bigtable_up: BigtableEmulator) -> Iterator[str]:
    """A table name no other test uses (the store creates the table);
    deleted at teardown if it was created."""
    name = f"keepcount_{uuid.uuid4().hex[:16]}"
    yield name
    drop_table(bigtable_up, name)


@pytest.fixture
def bigtable_url(bigtable_up: BigtableEmulator, bigtable_table: str) -> str:
    """``bigtable://keepcount/emulator/<fresh table>?emulator=127.0.0.1:P``."""
    return bigtable_up.url_for(bigtable_table)


def admin_client(emulator: BigtableEmulator) -> Any:
    """A table-admin client of the emulator (plaintext gRPC, no credentials)."""
    import grpc
    from google.cloud.bigtable_admin_v2 import BigtableTableAdminClient
    from google.cloud.bigtable_admin_v2.services.bigtable_table_admin.transports import (
        BigtableTableAdminGrpcTransport,
    )

    channel = grpc.insecure_channel(emulator.host)
    return BigtableTableAdminClient(transport=BigtableTableAdminGrpcTransport(channel=channel))


def table_path(table: str) -> str:
    return f"projects/{PROJECT}/instances/{INSTANCE}/tables/{table}"


def drop_table(emulator: BigtableEmulator, table: str) -> None:
    from google.api_core.exceptions import NotFound

    if not emulator.running():
        return  # gone with the emulator's memory
    admin = admin_client(emulator)
    try:
        admin.delete_table(name=table_path(table))
    except NotFound:
        pass
    finally:
        admin.transport.close()
