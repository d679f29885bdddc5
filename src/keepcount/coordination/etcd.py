"""The etcd v3 coordinator: a claim is a key bound to a lease.

``/keepcount/<namespace>/nodes/<node>`` is created in a transaction that
succeeds only if the key does not exist (``create_revision == 0``), with a
lease of ``ceil(ttl)`` seconds attached; the epoch is the key's
``create_revision``, which only grows.  Renewal is a lease keep-alive
followed by a read of the key: a keep-alive answered with TTL 0 means the
lease expired, a key that is gone or has another ``create_revision`` means it
was deleted (``evict``): either way the claim is lost.  ``evict`` is a
transaction comparing ``create_revision`` with the epoch.

Client: the generated gRPC stubs of ``aetcd`` 1.0 on a ``grpc.aio`` channel
this module owns.  ``aetcd`` is the one async etcd v3 client that imports with
current grpcio / protobuf (``etcd3`` needs protobuf < 4; ``etcd3aio`` had one
release); its high-level client sets one timeout for every call, so the
stubs are used directly for per-call deadlines, ``wait_for_ready`` and a
keep-alive whose send time is known.

Threads: each coordinator runs a private asyncio loop in a daemon thread.
Renewals, watches and every request run there; the public methods are
blocking and hand their work to that loop, so nothing depends on the
caller's event loop being responsive (a node's loop may be saturated by
HTTP load).  Watch callbacks run on one more thread per watch, so a slow
callback never delays a renewal.

Failover: the channel's target lists every endpoint
(``ipv4:127.0.0.1:23791,127.0.0.1:23792,...``) under gRPC's ``pick_first``
policy, with reconnect backoff capped at 1 s.  A killed member fails its
connection at once and the channel moves to the next address.  A paused or
cut-off member leaves the connection open but silent, so any renewal or
watch probe that fails also rotates the endpoint list and rebuilds the
channel: the next attempt goes to another member.  Measured with 2 s TTLs on
a loopback 3-member cluster: a killed follower costs no trust at all; a
killed leader costs 0 to 0.2 s of it (the election takes about 1.2 s, the
trust window after the last renewal is 1.0 to 1.5 s), never the claim.

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
import concurrent.futures
import ipaddress
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

import grpc  # type: ignore[import-untyped]
import grpc.aio  # type: ignore[import-untyped]
from aetcd import rpc  # type: ignore[import-untyped]

from keepcount.coordination import CoordinatorURL
from keepcount.coordination.base import (
    DEFAULT_TTL,
    ClaimState,
    Member,
    check_info,
    check_ttl,
    decode_info,
    describe_holder,
    encode_info,
    renew_interval,
)
from keepcount.errors import ClaimConflict, CoordinatorUnavailable, InvalidInput
from keepcount.naming import check_node_id

__all__ = ["EtcdClaim", "EtcdCoordinator", "EtcdWatch"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_CHANNEL_OPTIONS = [
    # gRPC's default reconnect backoff grows to 120 s: after an outage the
    # channel would sit idle long after etcd is back.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.lb_policy_name", "pick_first"),
]
# etcd cancels a watch with this metadata when its member loses the leader,
# instead of leaving it silently stale.
_REQUIRE_LEADER = (("hasleader", "true"),)
_READ_TIMEOUT = 2.0
"""Deadline of a request made for a watch (list, probe)."""
_WATCH_PROBE = 3.0
"""A watch stream quiet for this long gets a probe read through its channel."""
_RELEASE_TIMEOUT = 1.0
_ATTEMPT = 1.0
"""Deadline of one attempt of a request that is retried (claim, members,
evict): a member that hangs is given up on after this, and the next attempt
goes to another member."""


class _Interrupted(Exception):
    """A request was cut off because its channel was rebuilt (failover)."""


_TRANSIENT = (grpc.RpcError, _Interrupted, CoordinatorUnavailable)
# Answers that another member or another try would not change.
_FATAL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
}


async def _rpc(awaitable: Awaitable[T]) -> T:
    """Await one gRPC call.  grpc.aio reports a call aborted by closing its
    channel as ``asyncio.CancelledError``; unless this task itself is being
    cancelled that is a failover, to be retried like any transient error."""
    try:
        return await awaitable
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        raise _Interrupted("request cut off by a channel rebuild") from None


def _code(exc: BaseException) -> Any:
    return exc.code() if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") else None


def _range_end(prefix: bytes) -> bytes:
    """The end of etcd's range for every key under ``prefix``."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def _unavailable(what: str, exc: BaseException) -> CoordinatorUnavailable:
    if _code(exc) is not None:
        detail = f"{_code(exc).name}: {exc.details()}"  # type: ignore[attr-defined]
    else:
        detail = str(exc) or type(exc).__name__
    return CoordinatorUnavailable(f"etcd {what}: {detail}")


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


class EtcdWatch:
    """A membership watch: a task on the coordinator's loop reads etcd, a
    thread of its own calls the callback with the latest snapshot."""

    def __init__(
        self, coordinator: EtcdCoordinator, callback: Callable[[dict[str, Member]], None]
    ) -> None:
        self._coordinator = coordinator
        self._callback = callback
        self._cond = threading.Condition()
        self._pending: dict[str, Member] | None = None
        self._cancelled = False
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(
            target=self._dispatch, name="keepcount-etcd-watch", daemon=True
        )
        self._thread.start()

    def offer(self, members: dict[str, Member]) -> None:
        """Hand over the latest membership (loop thread); a snapshot not yet
        delivered is replaced."""
        with self._cond:
            self._pending = members
            self._cond.notify()

    def _dispatch(self) -> None:
        last: dict[str, Member] | None = None
        while True:
            with self._cond:
                while self._pending is None and not self._cancelled:
                    self._cond.wait()
                if self._cancelled:
                    return
                snapshot, self._pending = self._pending, None
            if snapshot is None or snapshot == last:
                continue
            last = snapshot
            try:
                self._callback(dict(snapshot))
            except Exception:
                log.exception("membership watch callback failed")

    def cancel(self) -> None:
        """Stop the watch; idempotent.  No call starts after it returns."""
        with self._cond:
            if self._cancelled:
                return
            self._cancelled = True
            self._cond.notify()
        self._coordinator._forget_watch(self)
        if threading.current_thread() is not self._thread:
            self._thread.join(10)


_grpc_pid: int | None = None
"""The process that first used gRPC here (see ``EtcdCoordinator``)."""


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
        global _grpc_pid
        if _grpc_pid is not None and _grpc_pid != os.getpid():
            raise InvalidInput(
                f"cannot use etcd in process {os.getpid()}: it was forked from process "
                f"{_grpc_pid} after that one used etcd, and gRPC's asyncio client cannot "
                "work across a fork (its channels never answer in the child).  Open the "
                "registry in each worker, after the fork (gunicorn without --preload), or "
                "take slots through ZooKeeper or local locks"
            )
        _grpc_pid = os.getpid()
        self.url = url or str(parsed)
        self.parsed = parsed
        self.prefix = (parsed.prefix + "/").encode()
        self._endpoints = list(parsed.endpoints)
        self._claims: set[EtcdClaim] = set()
        self._watches: set[EtcdWatch] = set()
        self._closed = False
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name=f"keepcount-etcd-{parsed.namespace}", daemon=True
        )
        self._thread.start()
        # Loop-thread state: the channel and its stubs, rebuilt on failover.
        self._channel: Any = None
        self._kv: Any = None
        self._lease: Any = None
        self._watch_stub: Any = None
        self._generation = 0
        self._failover_lock: asyncio.Lock | None = None
        self._submit(self._connect(), timeout=10.0)

    # -- the private loop -------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def _submit(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the private loop and wait for it (never from the loop)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking coordinator method was called on its own loop thread")
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError as exc:  # the loop is closed
            coro.close()
            raise CoordinatorUnavailable(f"coordinator {self.url} is closed") from exc
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            fut.cancel()
            raise CoordinatorUnavailable(
                f"etcd at {self.url} did not answer within {timeout} s"
            ) from exc

    async def _retrying(
        self, what: str, attempt: Callable[[float], Awaitable[T]], timeout: float
    ) -> T:
        """``attempt(deadline_of_this_attempt)`` until it succeeds or
        ``timeout`` runs out; between attempts fail over to another member."""
        deadline = time.monotonic() + timeout
        while True:
            generation = self._generation
            left = deadline - time.monotonic()
            try:
                return await attempt(max(0.01, min(left, _ATTEMPT)))
            except _TRANSIENT as exc:
                if _code(exc) in _FATAL or time.monotonic() + 0.05 >= deadline:
                    raise _unavailable(f"at {self.url} {what} within {timeout} s", exc) from exc
                log.debug("etcd %s: %r; retrying", what, exc)
                await self._failover(generation)
                await asyncio.sleep(0.05)

    async def _target(self) -> str:
        """A gRPC target listing every endpoint (names resolved now)."""
        loop = asyncio.get_running_loop()
        v4: list[str] = []
        v6: list[str] = []
        for host, port in self._endpoints:
            try:
                addr = ipaddress.ip_address(host)
            except ValueError:
                pass
            else:
                (v6 if addr.version == 6 else v4).append(
                    f"[{host}]:{port}" if addr.version == 6 else f"{host}:{port}"
                )
                continue
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("etcd endpoint %s does not resolve: %s", host, exc)
                continue
            family, _, _, _, sockaddr = sorted(infos, key=lambda i: i[0] != socket.AF_INET)[0]
            if family == socket.AF_INET:
                v4.append(f"{sockaddr[0]}:{port}")
            else:
                v6.append(f"[{sockaddr[0]}]:{port}")
        # A gRPC address list is of one family; IPv4 wins a mixed list.
        if v4:
            return "ipv4:" + ",".join(v4)
        if v6:
            return "ipv6:" + ",".join(v6)
        raise CoordinatorUnavailable(f"no etcd endpoint of {self.url} resolves")

    async def _connect(self) -> None:
        if self._failover_lock is None:
            self._failover_lock = asyncio.Lock()
        try:
            target = await self._target()
        except CoordinatorUnavailable:
            # Nothing resolves now: a channel that fails every call until the
            # next failover tries the names again.
            target = "ipv4:" + ",".join(f"{h}:{p}" for h, p in self._endpoints)
        self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._kv = rpc.KVStub(self._channel)
        self._lease = rpc.LeaseStub(self._channel)
        self._watch_stub = rpc.WatchStub(self._channel)
        self._generation += 1

    async def _failover(self, generation: int) -> None:
        """After a failed request on channel ``generation``: rotate the
        endpoints and rebuild the channel (once per generation)."""
        assert self._failover_lock is not None
        async with self._failover_lock:
            if generation != self._generation or self._closed:
                return
            self._endpoints.append(self._endpoints.pop(0))
            old = self._channel
            await self._connect()
            log.debug("etcd failover: now trying %s first", self._endpoints[0])
        # Closing aborts the calls still stuck on the old channel; their
        # callers see _Interrupted and retry on the new one.
        await old.close(None)

    # -- claims -----------------------------------------------------------

    def _key(self, node: str) -> bytes:
        return self.prefix + node.encode()

    def _member(self, kv: Any) -> Member:
        node = bytes(kv.key)[len(self.prefix) :].decode(errors="replace")
        return Member(node, int(kv.create_revision), decode_info(bytes(kv.value)))

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
        return self._submit(self._claim(node, value, seconds, timeout), timeout + 2.0)

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
                reply = await _rpc(
                    self._lease.LeaseGrant(
                        rpc.LeaseGrantRequest(TTL=seconds), timeout=limit, wait_for_ready=True
                    )
                )
                if reply.error:
                    raise CoordinatorUnavailable(f"etcd refused a lease: {reply.error}")
                grant = reply
            try:
                return await _rpc(
                    self._kv.Txn(
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
                if _code(exc) == grpc.StatusCode.NOT_FOUND:
                    grant = None  # the lease ran out while we retried: a new one
                raise

        try:
            txn = await self._retrying("did not answer the claim", attempt, timeout)
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
                raise ClaimConflict(describe_holder(node, self._member(kvs[0]) if kvs else None))
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
        call = self._lease.LeaseKeepAlive(timeout=timeout)
        try:
            await _rpc(call.write(rpc.LeaseKeepAliveRequest(ID=lease_id)))
            reply = await _rpc(call.read())
        finally:
            call.cancel()
        if reply is grpc.aio.EOF:
            raise _Interrupted("etcd closed the keep-alive stream")
        return int(reply.TTL)

    async def _renew(self, claim: EtcdClaim, sent: float) -> None:
        """Renew every ttl/4 from ``sent`` (the grant) until lost; after a
        failure retry soon, through another member."""
        interval = renew_interval(claim.ttl)
        rpc_timeout = max(interval, 0.2)
        retry = min(interval, 0.1)
        next_at = sent + interval
        try:
            while True:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                if claim.lost:  # released meanwhile
                    break
                generation = self._generation
                sent = time.monotonic()
                try:
                    ttl = await self._keepalive(claim.lease_id, rpc_timeout)
                    if ttl <= 0:
                        claim.mark_lost("its lease expired in etcd")
                        break
                    got = await _rpc(
                        self._kv.Range(rpc.RangeRequest(key=claim.key), timeout=rpc_timeout)
                    )
                except _TRANSIENT as exc:
                    log.debug("renewing %s failed: %r", claim.node, exc)
                    await self._failover(generation)
                    next_at = time.monotonic() + retry
                    continue
                if not got.kvs or int(got.kvs[0].create_revision) != claim.epoch:
                    claim.mark_lost("its key was deleted in etcd (evicted)")
                    break
                claim.renewed(sent, float(ttl))
                next_at = sent + interval
        finally:
            with self._lock:
                self._claims.discard(claim)
        if claim.reason != "released":
            # The key may be gone while the lease lives on (evicted): free it.
            await self._revoke_quietly(claim.lease_id)

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await _rpc(
                self._lease.LeaseRevoke(
                    rpc.LeaseRevokeRequest(ID=lease_id), timeout=_RELEASE_TIMEOUT
                )
            )
        except _TRANSIENT as exc:
            log.debug("revoking lease %x failed: %r", lease_id, exc)

    async def _release_async(self, claim: EtcdClaim) -> None:
        task = claim._task
        if task is not None and not task.done():
            task.cancel()
        await self._revoke_quietly(claim.lease_id)

    def _release(self, claim: EtcdClaim) -> None:
        with self._lock:
            self._claims.discard(claim)
        if self._loop.is_closed():
            return
        if threading.current_thread() is self._thread:
            self._loop.create_task(self._release_async(claim))
            return
        try:
            self._submit(self._release_async(claim), _RELEASE_TIMEOUT + 1.0)
        except CoordinatorUnavailable as exc:
            log.debug("releasing %s: %s", claim.node, exc)

    # -- membership -------------------------------------------------------

    async def _list(self, limit: float) -> tuple[dict[str, Member], int]:
        got = await _rpc(
            self._kv.Range(
                rpc.RangeRequest(key=self.prefix, range_end=_range_end(self.prefix)),
                timeout=limit,
                wait_for_ready=True,
            )
        )
        members = {m.node: m for m in map(self._member, got.kvs)}
        return members, int(got.header.revision)

    def members(self, timeout: float = 5.0) -> dict[str, Member]:
        """Every claimed node id of the namespace (a linearizable read)."""
        self._check_open()
        members, _ = self._submit(
            self._retrying("did not list members", self._list, timeout), timeout + 2.0
        )
        return members

    def watch(self, callback: Callable[[dict[str, Member]], None]) -> EtcdWatch:
        """Call ``callback`` with the membership now and after each change."""
        self._check_open()
        w = EtcdWatch(self, callback)
        with self._lock:
            self._watches.add(w)

        async def start() -> None:
            w._task = asyncio.create_task(self._watch_loop(w), name="etcd watch")

        self._submit(start(), 5.0)
        return w

    def _forget_watch(self, w: EtcdWatch) -> None:
        with self._lock:
            self._watches.discard(w)
        task = w._task
        if task is not None:
            try:
                self._loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop is closed: the task is gone with it
                pass

    async def _watch_loop(self, w: EtcdWatch) -> None:
        """List, then follow a watch stream from the listed revision; on any
        trouble list again (through another member if requests fail)."""
        prefix, end = self.prefix, _range_end(self.prefix)
        backoff = 0.05
        while True:
            generation = self._generation
            try:
                members, revision = await self._list(_READ_TIMEOUT)
                w.offer(dict(members))
                call = self._watch_stub.Watch(metadata=_REQUIRE_LEADER)
                probe = asyncio.create_task(self._probe(call, prefix))
                try:
                    await _rpc(
                        call.write(
                            rpc.WatchRequest(
                                create_request=rpc.WatchCreateRequest(
                                    key=prefix, range_end=end, start_revision=revision + 1
                                )
                            )
                        )
                    )
                    while True:
                        reply = await _rpc(call.read())
                        if reply is grpc.aio.EOF or reply.canceled or reply.compact_revision:
                            break
                        if not reply.events:
                            continue
                        for event in reply.events:
                            node = bytes(event.kv.key)[len(prefix) :].decode(errors="replace")
                            if event.type == rpc.Event.DELETE:
                                members.pop(node, None)
                            else:
                                members[node] = self._member(event.kv)
                        w.offer(dict(members))
                        backoff = 0.05
                finally:
                    probe.cancel()
                    call.cancel()
            except _TRANSIENT as exc:
                log.debug("etcd watch interrupted: %r", exc)
                await self._failover(generation)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _probe(self, call: Any, prefix: bytes) -> None:
        """While a watch stream is quiet, check now and then that its member
        still answers; if not, cancel the stream so the watch starts over."""
        while True:
            await asyncio.sleep(_WATCH_PROBE)
            try:
                await _rpc(
                    self._kv.Range(rpc.RangeRequest(key=prefix, limit=1), timeout=_READ_TIMEOUT)
                )
            except _TRANSIENT:
                call.cancel()
                return

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
            txn = await _rpc(
                self._kv.Txn(
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

        return self._submit(
            self._retrying("did not answer the eviction", attempt, timeout), timeout + 2.0
        )

    # -- lifecycle --------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CoordinatorUnavailable(f"coordinator {self.url} is closed")

    def close(self) -> None:
        """Release every claim, cancel every watch, stop the loop; idempotent."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("close() called on the coordinator's own loop thread")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            claims, watches = list(self._claims), list(self._watches)
        for w in watches:
            w.cancel()
        for c in claims:
            c.mark_lost("released")

        async def shutdown() -> None:
            for c in claims:
                if c._task is not None:
                    c._task.cancel()
            await asyncio.gather(*(self._revoke_quietly(c.lease_id) for c in claims))
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._channel.close(None)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(_RELEASE_TIMEOUT + 4.0)
        except (concurrent.futures.TimeoutError, grpc.RpcError) as exc:
            log.debug("closing %s: %r", self.url, exc)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> EtcdCoordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EtcdCoordinator {self.url}>"
