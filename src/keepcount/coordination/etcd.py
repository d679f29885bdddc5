"""The etcd v3 coordinator: a claim is a key bound to a lease.

``/keepcount/<namespace>/nodes/<node>`` is created in a transaction that
succeeds only if the key does not exist (``create_revision == 0``), with a
lease of ``ceil(ttl)`` seconds attached; the epoch is the key's
``create_revision``, which only grows.  Renewal is a lease keep-alive
followed by a read of the key: a keep-alive answered with TTL 0 means the
lease expired, a key that is gone or has another ``create_revision`` means it
was deleted (``evict``): either way the claim is lost.  ``evict`` is a
transaction comparing ``create_revision`` with the epoch.

The connection (``coordination.etcd_channel``): the public methods are
blocking and run their work on a private asyncio loop, through a gRPC
channel that fails over to another member when a request fails.  Listing
and watching the claim keys: ``coordination.etcd_members``.

Measured with 2 s TTLs on a loopback 3-member cluster: a killed follower
costs no trust at all; a killed leader costs 0 to 0.2 s of it (the election
takes about 1.2 s, the trust window after the last renewal is 1.0 to 1.5 s),
never the claim.

When the whole cluster is down, renewals keep failing and each claim turns
untrusted at its deadline (``trusted()`` goes False; the claim is not
``lost``: nobody said so).  What happens when etcd is back depends on how it
was gone, as measured on this machine with 2 s TTLs:

- paused (SIGSTOP) past the TTL: the leader's clock ran on, it revokes the
  expired lease as soon as it runs, the next keep-alive answers TTL 0 and
  the claim is ``lost``: claim again for a new epoch;
- killed and restarted (or a leader change): leases are persisted and a new
  leader extends every lease by a full TTL when it takes over, so the lease
  survives even a long outage; the next renewal succeeds, the key is still
  there at the same epoch and the claim is trusted again.

Both are safe: while the key existed nobody else could create it, and the
holder acknowledged nothing while it was untrusted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc  # type: ignore[import-untyped]
import grpc.aio  # type: ignore[import-untyped]
from aetcd import rpc  # type: ignore[import-untyped]
from tenacity import wait_fixed

from keepcount.coordination.base import (
    DEFAULT_TTL,
    ClaimState,
    Member,
    check_info,
    check_ttl,
    describe_holder,
    encode_info,
    renew_interval,
)
from keepcount.coordination.etcd_channel import (
    TRANSIENT,
    EtcdChannel,
    Interrupted,
    call,
    check_not_forked,
    status_code,
)
from keepcount.coordination.etcd_members import EtcdWatch, list_members, member_of
from keepcount.coordination.urls import CoordinatorURL
from keepcount.errors import ClaimConflict, CoordinatorUnavailable
from keepcount.naming import check_node_id

__all__ = ["EtcdClaim", "EtcdCoordinator", "EtcdWatch"]

log = logging.getLogger(__name__)

_RELEASE_TIMEOUT = 1.0


class EtcdClaim(ClaimState):
    """A claim held through an etcd lease; see ``keepcount.coordination.base``."""

    def __init__(
        self,
        coordinator: EtcdCoordinator,
        node: str,
        epoch: int,
        ttl: float,
        sent: float,
        lease_id: int,
        key: bytes,
    ) -> None:
        super().__init__(node, epoch, ttl, sent)
        self.lease_id = lease_id
        self.key = key
        self._coordinator = coordinator
        self._task: asyncio.Task[None] | None = None

    def _release_remote(self) -> None:
        self._coordinator._release(self)


class EtcdCoordinator:
    """Claims as etcd keys bound to leases; see the module docstring.

    Example::

        coordinator = EtcdCoordinator(parse_coordinator_url("etcd://127.0.0.1:2379/app"))
        claim = coordinator.claim("node-1", {"url": "http://127.0.0.1:8101"})
        coordinator.members()["node-1"].epoch == claim.epoch
        coordinator.close()
    """

    def __init__(self, parsed: CoordinatorURL, *, url: str | None = None) -> None:
        if parsed.scheme != "etcd":
            raise ValueError(f"not an etcd URL: {parsed}")
        check_not_forked()
        self.url = url or str(parsed)
        self.parsed = parsed
        self.prefix = (parsed.prefix + "/").encode()
        self._claims: set[EtcdClaim] = set()
        self._watches: set[EtcdWatch] = set()
        self._lock = threading.Lock()
        self._ch = EtcdChannel(parsed, self.url)

    # -- claims -----------------------------------------------------------

    def _key(self, node: str) -> bytes:
        return self.prefix + node.encode()

    def claim(
        self,
        node: str,
        info: Mapping[str, str] | None = None,
        *,
        ttl: float = DEFAULT_TTL,
        timeout: float = 5.0,
    ) -> EtcdClaim:
        """Create the node's key under a new lease; see ``coordination.base``."""
        check_node_id(node)
        value = encode_info(check_info(info))
        ttl = check_ttl(ttl)
        self._check_open()
        # Leases are granted in whole seconds: round up, never below the ttl asked.
        seconds = max(1, math.ceil(ttl))
        return self._ch.submit(self._claim(node, value, seconds, timeout), timeout + 2.0)

    async def _claim(self, node: str, value: bytes, seconds: int, timeout: float) -> EtcdClaim:
        key = self._key(node)
        # Attempts share one lease, so a put whose answer was lost is
        # recognised by the next attempt (the key then carries our lease).
        grant: Any = None
        sent = 0.0

        async def attempt(limit: float) -> Any:
            nonlocal grant, sent
            if grant is None:
                sent = time.monotonic()
                reply = await call(
                    self._ch.lease.LeaseGrant(
                        rpc.LeaseGrantRequest(TTL=seconds), timeout=limit, wait_for_ready=True
                    )
                )
                if reply.error:
                    raise CoordinatorUnavailable(f"etcd refused a lease: {reply.error}")
                grant = reply
            try:
                return await call(
                    self._ch.kv.Txn(
                        rpc.TxnRequest(
                            compare=[
                                rpc.Compare(
                                    key=key,
                                    result=rpc.Compare.EQUAL,
                                    target=rpc.Compare.CREATE,
                                    create_revision=0,
                                )
                            ],
                            success=[
                                rpc.RequestOp(
                                    request_put=rpc.PutRequest(key=key, value=value, lease=grant.ID)
                                )
                            ],
                            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
                        ),
                        timeout=limit,
                        wait_for_ready=True,
                    )
                )
            except grpc.RpcError as exc:
                if status_code(exc) == grpc.StatusCode.NOT_FOUND:
                    grant = None  # the lease ran out while we retried: a new one
                raise

        try:
            txn = await self._ch.within("did not answer the claim", attempt, timeout)
        except BaseException:
            if grant is not None:
                # If a put landed, revoking its lease deletes it.
                await self._revoke_quietly(grant.ID)
            raise
        if txn.succeeded:
            epoch = int(txn.header.revision)
        else:
            kvs = txn.responses[0].response_range.kvs
            if kvs and int(kvs[0].lease) == int(grant.ID):
                epoch = int(kvs[0].create_revision)  # an earlier attempt's put landed
            else:
                await self._revoke_quietly(grant.ID)
                raise ClaimConflict(
                    describe_holder(node, member_of(self.prefix, kvs[0]) if kvs else None)
                )
        claim = EtcdClaim(
            self,
            node,
            epoch=epoch,
            ttl=float(grant.TTL),
            sent=sent,
            lease_id=int(grant.ID),
            key=key,
        )
        with self._lock:
            self._claims.add(claim)
        claim._task = asyncio.create_task(self._renew(claim, sent), name=f"renew {node}")
        return claim

    async def _keepalive(self, lease_id: int, timeout: float) -> int:
        """One keep-alive round trip; the lease's TTL (0: it is gone)."""
        stream = self._ch.lease.LeaseKeepAlive(timeout=timeout)
        try:
            await call(stream.write(rpc.LeaseKeepAliveRequest(ID=lease_id)))
            reply = await call(stream.read())
        finally:
            stream.cancel()
        if reply is grpc.aio.EOF:
            raise Interrupted("etcd closed the keep-alive stream")
        return int(reply.TTL)

    async def _renew_once(self, claim: EtcdClaim, timeout: float) -> float | None:
        """One renewal: a keep-alive, then a read of the key.  Its send time
        (None: the claim is released or lost, marked so)."""
        if claim.lost:  # released meanwhile
            return None
        sent = time.monotonic()
        ttl = await self._keepalive(claim.lease_id, timeout)
        if ttl <= 0:
            claim.mark_lost("its lease expired in etcd")
            return None
        got = await call(self._ch.kv.Range(rpc.RangeRequest(key=claim.key), timeout=timeout))
        if not got.kvs or int(got.kvs[0].create_revision) != claim.epoch:
            claim.mark_lost("its key was deleted in etcd (evicted)")
            return None
        claim.renewed(sent, float(ttl))
        return sent

    async def _renew(self, claim: EtcdClaim, sent: float | None) -> None:
        """Renew every ttl/4 from ``sent`` (the grant) until lost; after a
        failure retry soon (every ttl/4, at most 0.1 s), through another member."""
        interval = renew_interval(claim.ttl)
        rpc_timeout = max(interval, 0.2)
        retry = min(interval, 0.1)
        try:
            while sent is not None:
                await asyncio.sleep(max(0.0, sent + interval - time.monotonic()))
                retrying = self._ch.retrying(f"renewing {claim.node}", wait=wait_fixed(retry),
                                             fatal=False)  # fmt: skip
                sent = await retrying(self._renew_once, claim, rpc_timeout)
        finally:
            with self._lock:
                self._claims.discard(claim)
        if claim.reason != "released":
            # The key may be gone while the lease lives on (evicted): free it.
            await self._revoke_quietly(claim.lease_id)

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await call(
                self._ch.lease.LeaseRevoke(
                    rpc.LeaseRevokeRequest(ID=lease_id), timeout=_RELEASE_TIMEOUT
                )
            )
        except TRANSIENT as exc:
            log.debug("revoking lease %x failed: %r", lease_id, exc)

    async def _release_async(self, claim: EtcdClaim) -> None:
        task = claim._task
        if task is not None and not task.done():
            task.cancel()
        await self._revoke_quietly(claim.lease_id)

    def _release(self, claim: EtcdClaim) -> None:
        with self._lock:
            self._claims.discard(claim)
        if self._ch.loop.is_closed():
            return
        if self._ch.on_loop_thread():
            self._ch.loop.create_task(self._release_async(claim))
            return
        try:
            self._ch.submit(self._release_async(claim), _RELEASE_TIMEOUT + 1.0)
        except CoordinatorUnavailable as exc:
            log.debug("releasing %s: %s", claim.node, exc)

    # -- membership -------------------------------------------------------

    def members(self, timeout: float = 5.0) -> dict[str, Member]:
        """Every claimed node id of the namespace (a linearizable read)."""
        self._check_open()

        async def attempt(limit: float) -> tuple[dict[str, Member], int]:
            return await list_members(self._ch, self.prefix, limit)

        members, _ = self._ch.submit(
            self._ch.within("did not list members", attempt, timeout), timeout + 2.0
        )
        return members

    def watch(self, callback: Callable[[dict[str, Member]], None]) -> EtcdWatch:
        """Call ``callback`` with the membership now and after each change."""
        self._check_open()
        w = EtcdWatch(self._ch, self.prefix, callback, self._forget_watch)
        with self._lock:
            self._watches.add(w)
        w.start()
        return w

    def _forget_watch(self, w: EtcdWatch) -> None:
        with self._lock:
            self._watches.discard(w)

    # -- eviction ---------------------------------------------------------

    def evict(self, node: str, epoch: int, timeout: float = 5.0) -> bool:
        """Delete the node's key iff its create_revision is ``epoch``.

        Retried through other members within ``timeout``; after an attempt
        whose answer was lost, a retry finds the key gone and answers False.
        """
        check_node_id(node)
        self._check_open()
        key = self._key(node)

        async def attempt(limit: float) -> bool:
            txn = await call(
                self._ch.kv.Txn(
                    rpc.TxnRequest(
                        compare=[
                            rpc.Compare(
                                key=key,
                                result=rpc.Compare.EQUAL,
                                target=rpc.Compare.CREATE,
                                create_revision=int(epoch),
                            )
                        ],
                        success=[
                            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))
                        ],
                    ),
                    timeout=limit,
                    wait_for_ready=True,
                )
            )
            return bool(txn.succeeded)

        return self._ch.submit(
            self._ch.within("did not answer the eviction", attempt, timeout), timeout + 2.0
        )

    # -- lifecycle --------------------------------------------------------

    def _check_open(self) -> None:
        if self._ch.closed:
            raise CoordinatorUnavailable(f"coordinator {self.url} is closed")

    def close(self) -> None:
        """Release every claim, cancel every watch, stop the loop; idempotent."""
        if self._ch.on_loop_thread():
            raise RuntimeError("close() called on the coordinator's own loop thread")
        with self._lock:
            if self._ch.closed:
                return
            self._ch.closed = True
            claims, watches = list(self._claims), list(self._watches)
        for w in watches:
            w.cancel()
        for c in claims:
            c.mark_lost("released")

        async def release_all() -> None:
            for c in claims:
                if c._task is not None:
                    c._task.cancel()
            await asyncio.gather(*(self._revoke_quietly(c.lease_id) for c in claims))

        self._ch.close(release_all())

    def __enter__(self) -> EtcdCoordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EtcdCoordinator {self.url}>"
