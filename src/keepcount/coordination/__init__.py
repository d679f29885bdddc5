"""Coordinators: claims on node ids with fencing epochs, chosen by URL.

``etcd://host:port,host:port,.../namespace`` and
``zookeeper://host:port,.../namespace``.  The namespace is optional
(``default``); ports default to the servers' usual ones (2379, 2181).  Every
host of the cluster should be listed: the client fails over between them.
Keys live at ``/keepcount/<namespace>/nodes/<node>`` in both backends.

Example::

    coordinator = open_coordinator("etcd://127.0.0.1:2379/shop")
    claim = coordinator.claim("node-1", {"url": "http://127.0.0.1:8101"})
    assert claim.trusted()
    coordinator.close()     # releases the claim

The backends import their client library (``aetcd``, ``kazoo``) only when a
URL of theirs is opened; a missing one raises ``InvalidInput`` naming the
extra to install.
"""

from __future__ import annotations

from keepcount.coordination.base import DEFAULT_TTL, Claim, Coordinator, Member, Watch
from keepcount.coordination.urls import (
    DEFAULT_NAMESPACE,
    DEFAULT_PORTS,
    CoordinatorURL,
    parse_coordinator_url,
)
from keepcount.errors import InvalidInput

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_PORTS",
    "DEFAULT_TTL",
    "Claim",
    "Coordinator",
    "CoordinatorURL",
    "Member",
    "Watch",
    "open_coordinator",
    "parse_coordinator_url",
]


def open_coordinator(url: str) -> Coordinator:
    """Open the coordinator a URL names.

    Does not contact the servers: the first ``claim``/``members``/``watch``
    does, within its own timeout.  ``InvalidInput`` for a malformed URL or a
    missing client library.
    """
    parsed = parse_coordinator_url(url)
    if parsed.scheme == "etcd":
        try:
            from keepcount.coordination.etcd import EtcdCoordinator
        except ModuleNotFoundError as exc:
            if not _is_client(exc):
                raise
            raise _missing(url, "etcd", exc) from exc
        return EtcdCoordinator(parsed, url=url)
    try:
        from keepcount.coordination.zookeeper import ZooKeeperCoordinator
    except ModuleNotFoundError as exc:
        if not _is_client(exc):
            raise
        raise _missing(url, "zookeeper", exc) from exc
    return ZooKeeperCoordinator(parsed, url=url)


def _is_client(exc: ModuleNotFoundError) -> bool:
    """Is the missing module a client library (rather than a bug to surface as is)?"""
    return (exc.name or "").split(".")[0] in ("aetcd", "grpc", "google", "kazoo")


def _missing(url: str, extra: str, exc: ModuleNotFoundError) -> InvalidInput:
    return InvalidInput(
        f"{url!r} needs the {extra} client library ({exc.name} is missing): "
        f"pip install 'keepcount[{extra}]'"
    )
