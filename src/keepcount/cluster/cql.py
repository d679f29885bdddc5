"""A CQL session pinned to one Cassandra node: the local cluster's probe.

``CqlConnection`` asks *one* node (its ``system.*`` tables, its failure
detector, as coordinator of the query); ``CqlError`` is an error it answered.
Used by ``keepcount.cluster.cassandra`` to tell when nodes are UP or DOWN as
seen by each other.
"""

from __future__ import annotations

from typing import Self

__all__ = ["CqlConnection", "CqlError"]


class CqlError(Exception):
    """An error a node answered a probe with.  For *Unavailable*,
    ``required`` and ``alive`` are the replica counts the coordinator
    reported (``unavailable`` is then true)."""

    def __init__(
        self, message: str, *, unavailable: bool = False, required: int = 0, alive: int = 0
    ) -> None:
        super().__init__(message)
        self.unavailable = unavailable
        self.required = required
        self.alive = alive


class CqlConnection:
    """A ``cassandra-driver`` session pinned to one node: the manager's probe
    of *that* node's view (its ``system.*`` tables, its failure detector, as
    coordinator of the query).  Rows come back as dicts.

    ``OSError`` if the node does not answer within ``timeout`` seconds;
    ``CqlError`` for an error it answered.
    """

    def __init__(self, host: str, port: int, timeout: float = 2.0) -> None:
        import warnings

        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import FallthroughRetryPolicy, WhiteListRoundRobinPolicy
        from cassandra.query import dict_factory

        profile = ExecutionProfile(
            load_balancing_policy=WhiteListRoundRobinPolicy([host]),
            retry_policy=FallthroughRetryPolicy(),
            request_timeout=timeout,
            row_factory=dict_factory,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the driver warns about hosts outside the whitelist
            self._cluster = Cluster(
                [host], port=port, protocol_version=5, connect_timeout=timeout,
                control_connection_timeout=timeout, execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            )  # fmt: skip
        try:
            self._session = self._cluster.connect()
        except Exception as exc:
            self._cluster.shutdown()
            raise OSError(f"Cassandra at {host}:{port} does not answer: {exc}") from None

    def close(self) -> None:
        self._cluster.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, cql: str, consistency: str = "ONE") -> list[dict[str, object]]:
        """Run one statement; its rows (empty for a statement without rows)."""
        import cassandra
        from cassandra import ConsistencyLevel
        from cassandra.query import SimpleStatement

        statement = SimpleStatement(cql, consistency_level=getattr(ConsistencyLevel, consistency))
        try:
            return list(self._session.execute(statement))
        except cassandra.Unavailable as exc:
            raise CqlError(
                str(exc), unavailable=True, required=exc.required_replicas,
                alive=exc.alive_replicas,
            ) from None  # fmt: skip
        except (cassandra.OperationTimedOut, cassandra.cluster.NoHostAvailable) as exc:
            raise OSError(str(exc)) from None
        except cassandra.DriverException as exc:
            raise CqlError(str(exc)) from None
