"""The ZooKeeper coordinator: a claim is an ephemeral znode of its own session.

Each claim opens its own kazoo session with the claim's TTL as session
timeout and creates the ephemeral znode ``/keepcount/<namespace>/nodes/<node>``;
the epoch is the znode's ``czxid`` (the zxid of its creation), which only
grows.  The claim lives as long as the session: closing the session
(``release``) or its expiry deletes the znode.  One more session per
coordinator, opened on first use, serves ``members``, ``watch``
(``coordination.zookeeper_watch``) and ``evict``.

Renewal and the deadline: kazoo pings on its own thread but does not say
when a ping was answered, so each claim runs a thread of its own that, every
ttl/4, sends ``sync`` then ``exists`` on its znode and notes the send time.
``sync`` goes through the leader, so a member cut off from the quorum cannot
answer it from stale state, and the ``exists`` answer proves the server had
the session alive (and touched) after the send.  If the znode is gone, has
another ``czxid`` or another owner, the claim is lost; kazoo's ``LOST`` state
(session expired) loses it too.  The TTL used is the *negotiated* session
timeout (ZooKeeper clamps the one asked into [minSessionTimeout,
maxSessionTimeout]); kazoo keeps it to itself, so this module reads it where
kazoo's connection handler computes it from the server's answer.

``evict(node, epoch)``: ZooKeeper's conditional delete compares the data
version, which restarts at 0 with every incarnation, so it cannot tell one
incarnation from the next.  A claim's znode therefore also records its
session's password (beside, not in, the published info); ``evict`` checks
the ``czxid``, then attaches to that session and closes it.  Closing a
session deletes exactly that session's ephemerals: a newer incarnation,
having another session, is never touched.  (Anyone who can read the
namespace can thus end a holder's session; with ZooKeeper's default open
ACLs they could delete its znode anyway.)

When ZooKeeper is unreachable, renewals fail and each claim turns untrusted
at its deadline (not ``lost``: nobody said so).  When it comes back kazoo
reconnects with the same session, and, as measured with 2 s sessions:

- after a pause (SIGSTOP) past the session timeout the server's clock ran
  on, it expires the session, kazoo reports ``LOST`` and the claim is
  ``lost``: claim again for a new epoch;
- after a restart (kill and start) the server reloads its sessions from its
  log with a fresh timeout, the session is revalidated, the next renewal
  succeeds and the claim is trusted again.

Both are safe: while the session lived nobody else could create the znode,
and the holder acknowledged nothing while it was untrusted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kazoo.client import KazooClient, KazooState  # type: ignore[import-untyped]
from kazoo.exceptions import (  # type: ignore[import-untyped]
    KazooException,
    NodeExistsError,
    NoNodeError,
    SessionExpiredError,
)
from kazoo.handlers.threading import KazooTimeoutError  # type: ignore[import-untyped]
from tenacity import Retrying, before_sleep_log, retry_if_exception_type

from keepcount.coordination.base import (
    DEFAULT_TTL,
    ClaimState,
    Member,
    check_info,
    check_ttl,
    decode_info,
    decode_value,
    describe_holder,
    encode_info,
    renew_interval,
)
from keepcount.coordination.urls import CoordinatorURL
from keepcount.coordination.zookeeper_watch import ZooKeeperWatch
from keepcount.errors import ClaimConflict, CoordinatorUnavailable
from keepcount.naming import check_node_id

__all__ = ["ZooKeeperClaim", "ZooKeeperCoordinator", "ZooKeeperWatch"]

log = logging.getLogger(__name__)

# kazoo's default reconnect backoff grows towards an hour; after an outage a
# claim's session must be back within its timeout or it is lost.
_CONNECTION_RETRY = {"max_tries": -1, "delay": 0.05, "backoff": 1.5, "max_delay": 0.5}
_READ_TIMEOUT = 2.0
_MAIN_SESSION_TIMEOUT = 4.0
"""Session timeout of the coordinator's own session (reads, watches): kazoo
notices a dead server after 2/3 of it and moves to the next."""
_STOP_WAIT = 2.0
_FAILURES = (KazooException, KazooTimeoutError)


class _Session:
    """A kazoo client plus the session timeout the server negotiated."""

    def __init__(
        self, hosts: str, timeout: float, client_id: tuple[int, bytes] | None = None
    ) -> None:
        self.requested = timeout
        self.client = KazooClient(
            hosts=hosts,
            timeout=timeout,
            client_id=client_id,
            connection_retry=dict(_CONNECTION_RETRY),
        )
        self._negotiated: float | None = None
        self._known = threading.Event()
        self._hook_negotiation()
        self._stopped = False
        self._stop_lock = threading.Lock()

    def _hook_negotiation(self) -> None:
        # ConnectionHandler._connect returns (read timeout, connect timeout),
        # the read timeout being 2/3 of the negotiated session timeout in ms.
        conn = getattr(self.client, "_connection", None)
        original = getattr(conn, "_connect", None)
        if conn is None or original is None:  # another kazoo: fall back to what was asked
            self._negotiated = self.requested
            self._known.set()
            return

        def _connect(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            self._negotiated = round(float(result[0]) * 1.5) / 1000.0
            self._known.set()
            return result

        conn._connect = _connect

    def start(self, timeout: float) -> None:
        """Connect; ``CoordinatorUnavailable`` if no server answers in time."""
        deadline = time.monotonic() + timeout
        try:
            self.client.start(timeout=max(timeout, 0.01))
        except (KazooTimeoutError, KazooException, OSError) as exc:
            self.stop()
            raise CoordinatorUnavailable(
                f"ZooKeeper at {self.client.hosts} did not answer within {timeout} s: {exc!r}"
            ) from exc
        # start() returns as soon as the session is live, a moment before the
        # hook above has seen the negotiated timeout.
        if not self._known.wait(max(0.0, deadline - time.monotonic()) + 1.0):
            self.stop()
            raise CoordinatorUnavailable("ZooKeeper session timeout not negotiated in time")

    @property
    def ttl(self) -> float:
        """The negotiated session timeout (seconds)."""
        return self._negotiated if self._negotiated is not None else self.requested

    @property
    def session_id(self) -> int | None:
        cid = self.client.client_id
        return int(cid[0]) if cid else None

    def stop(self, wait: float = _STOP_WAIT) -> None:
        """Close the session (deletes its ephemerals) and free the client;
        idempotent.  Waits at most ``wait`` seconds: with the server
        unreachable kazoo would block for most of the session timeout, and
        the session then expires on its own anyway."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        stopper = threading.Thread(target=self._stop_now, name="keepcount-zk-stop", daemon=True)
        stopper.start()
        stopper.join(wait)

    def _stop_now(self) -> None:
        try:
            self.client.stop()
            self.client.close()
        except Exception as exc:  # a half-started client may fail to stop cleanly
            log.debug("stopping a ZooKeeper client: %r", exc)


class ZooKeeperClaim(ClaimState):
    """A claim held by its own ZooKeeper session; see ``keepcount.coordination.base``."""

    def __init__(
        self,
        coordinator: ZooKeeperCoordinator,
        node: str,
        epoch: int,
        session: _Session,
        sent: float,
        path: str,
        session_id: int,
    ) -> None:
        super().__init__(node, epoch, session.ttl, sent)
        self.path = path
        self.session_id = session_id
        self._coordinator = coordinator
        self._session = session
        self._stop = threading.Event()
        session.client.add_listener(self._on_state)
        self._thread = threading.Thread(
            target=self._renew, args=(sent,), name=f"keepcount-zk-renew-{node}", daemon=True
        )
        self._thread.start()

    def _on_state(self, state: str) -> bool:
        # Runs on kazoo's connection thread: record and return, never block.
        if state == KazooState.LOST:
            self.mark_lost("its ZooKeeper session expired")
            self._stop.set()
            return True  # remove this listener
        return False

    def _renew(self, sent: float) -> None:
        """Renew every ttl/4 from ``sent`` until stopped or lost; after a
        failure retry soon (every ttl/4, at most 0.1 s; a release ends the wait)."""
        retrying = Retrying(
            retry=retry_if_exception_type(_FAILURES),
            wait=lambda _: min(renew_interval(self._session.ttl), 0.1),
            sleep=self._pause,
            before_sleep=before_sleep_log(log, logging.DEBUG),
        )
        renewed: float | None = sent
        while renewed is not None and not self._stop.wait(
            max(0.0, renewed + renew_interval(self._session.ttl) - time.monotonic())
        ):
            renewed = retrying(self._renew_once)
        if self.reason != "released":
            self._coordinator._forget(self)
            self._session.stop()

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _renew_once(self) -> float | None:
        """One renewal (sync, then exists); its send time, None once stopped or lost."""
        if self._stop.is_set():
            return None
        client = self._session.client
        rpc_timeout = max(renew_interval(self._session.ttl), 0.2)
        sent = time.monotonic()
        try:
            client.sync_async(self.path).get(timeout=rpc_timeout)
            stat = client.exists_async(self.path).get(timeout=rpc_timeout)
        except SessionExpiredError:
            if not self._stop.is_set():
                self.mark_lost("its ZooKeeper session expired")
            return None
        if stat is None or stat.czxid != self.epoch or stat.ephemeralOwner != self.session_id:
            self.mark_lost("its znode was deleted in ZooKeeper (evicted)")
            return None
        self.renewed(sent, self._session.ttl)
        return sent

    def _release_remote(self) -> None:
        self._stop.set()
        self._coordinator._forget(self)
        self._session.stop()


class ZooKeeperCoordinator:
    """Claims as ephemeral znodes; see the module docstring.

    Example::

        coordinator = ZooKeeperCoordinator(parse_coordinator_url("zookeeper://127.0.0.1:2181/app"))
        claim = coordinator.claim("node-1", {"url": "http://127.0.0.1:8101"})
        coordinator.members()["node-1"].epoch == claim.epoch
        coordinator.close()
    """

    def __init__(self, parsed: CoordinatorURL, *, url: str | None = None) -> None:
        if parsed.scheme != "zookeeper":
            raise ValueError(f"not a ZooKeeper URL: {parsed}")
        self.url = url or str(parsed)
        self.parsed = parsed
        self.hosts = ",".join(parsed.hostports())
        self.root = parsed.prefix
        self._lock = threading.Lock()
        self._main_lock = threading.Lock()
        self._main: _Session | None = None
        self._claims: set[ZooKeeperClaim] = set()
        self._watches: set[ZooKeeperWatch] = set()
        self._closed = False

    # -- sessions ---------------------------------------------------------

    def _main_session(self, timeout: float) -> _Session:
        """The shared session for reads, watches and evictions (opened once)."""
        # A lock of its own: connecting may take the whole timeout, and claims
        # and watches must not wait for it to touch their bookkeeping.
        with self._main_lock:
            self._check_open()
            if self._main is not None:
                return self._main
            session = _Session(self.hosts, _MAIN_SESSION_TIMEOUT)
            session.start(timeout)
            session.client.add_listener(self._on_main_state)
            with self._lock:
                if self._closed:
                    session.stop()
                    self._check_open()
                self._main = session
            return session

    def _on_main_state(self, state: str) -> None:
        # Watches re-read after a reconnection: events may have been missed.
        if state == KazooState.CONNECTED:
            with self._lock:
                watches = list(self._watches)
            for w in watches:
                w.fire()

    def _path(self, node: str) -> str:
        return f"{self.root}/{node}"

    # -- claims -----------------------------------------------------------

    def claim(
        self,
        node: str,
        info: Mapping[str, str] | None = None,
        *,
        ttl: float = DEFAULT_TTL,
        timeout: float = 5.0,
    ) -> ZooKeeperClaim:
        """Create the node's ephemeral znode in a new session; see ``coordination.base``."""
        check_node_id(node)
        published = check_info(info)
        ttl = check_ttl(ttl)
        self._check_open()
        deadline = time.monotonic() + timeout

        def remaining() -> float:
            return max(0.01, deadline - time.monotonic())

        session = _Session(self.hosts, ttl)
        session.start(timeout)
        path = self._path(node)
        client = session.client
        try:
            cid = client.client_id
            if cid is None:
                raise CoordinatorUnavailable(f"ZooKeeper at {self.hosts}: session dropped")
            session_id = int(cid[0])
            value = encode_info(published, session=bytes(cid[1]).hex())
            client.ensure_path_async(self.root).get(timeout=remaining())
            sent = time.monotonic()
            _, stat = client.create_async(path, value, ephemeral=True, include_data=True).get(
                timeout=remaining()
            )
        except NodeExistsError:
            holder = self._holder(client, node, remaining())
            session.stop()
            raise ClaimConflict(describe_holder(node, holder)) from None
        except _FAILURES as exc:
            # Outcome unknown: closing the session deletes the znode if it was made.
            session.stop()
            raise CoordinatorUnavailable(
                f"ZooKeeper at {self.hosts} did not answer the claim within {timeout} s: {exc!r}"
            ) from exc
        except BaseException:
            session.stop()
            raise
        claim = ZooKeeperClaim(self, node, int(stat.czxid), session, sent, path, session_id)
        with self._lock:
            closed = self._closed
            if not closed:
                self._claims.add(claim)
        if closed:
            claim.release()
            raise CoordinatorUnavailable(f"coordinator {self.url} was closed")
        return claim

    def _holder(self, client: Any, node: str, timeout: float) -> Member | None:
        try:
            data, stat = client.get_async(self._path(node)).get(timeout=timeout)
        except _FAILURES:
            return None
        return Member(node, int(stat.czxid), decode_info(data))

    def _forget(self, claim: ZooKeeperClaim) -> None:
        with self._lock:
            self._claims.discard(claim)

    # -- membership -------------------------------------------------------

    def _read_members(
        self, watch: Callable[..., None] | None = None, timeout: float = _READ_TIMEOUT
    ) -> dict[str, Member]:
        """sync, then the children and their data, pipelined."""
        client = self._main_session(timeout).client
        try:
            client.sync_async(self.root).get(timeout=timeout)
            try:
                children = client.get_children_async(self.root, watch=watch).get(timeout=timeout)
            except NoNodeError:
                # Create the namespace so there is something to watch.
                client.ensure_path_async(self.root).get(timeout=timeout)
                children = client.get_children_async(self.root, watch=watch).get(timeout=timeout)
            pending = [(c, client.get_async(self._path(c))) for c in children]
            members: dict[str, Member] = {}
            for child, result in pending:
                try:
                    data, stat = result.get(timeout=timeout)
                except NoNodeError:
                    continue  # gone between the two reads
                members[child] = Member(child, int(stat.czxid), decode_info(data))
        except _FAILURES as exc:
            raise CoordinatorUnavailable(
                f"ZooKeeper at {self.hosts} did not list members: {exc!r}"
            ) from exc
        return members

    def members(self, timeout: float = 5.0) -> dict[str, Member]:
        """Every claimed node id of the namespace (read after a ``sync``)."""
        return self._read_members(timeout=timeout)

    def watch(self, callback: Callable[[dict[str, Member]], None]) -> ZooKeeperWatch:
        """Call ``callback`` with the membership now and after each change."""
        self._check_open()
        w = ZooKeeperWatch(self._read_members, callback, self._forget_watch)
        with self._lock:
            self._watches.add(w)
        return w

    def _forget_watch(self, w: ZooKeeperWatch) -> None:
        with self._lock:
            self._watches.discard(w)

    # -- eviction ---------------------------------------------------------

    def evict(self, node: str, epoch: int, timeout: float = 5.0) -> bool:
        """Close the session that holds ``node`` iff its znode's czxid is
        ``epoch`` (see the module docstring); True once this call made the
        znode go, False if it was not there at that epoch (or its session
        had already expired)."""
        check_node_id(node)
        deadline = time.monotonic() + timeout
        client = self._main_session(timeout).client
        path = self._path(node)
        closed_at: float | None = None
        while time.monotonic() < deadline:
            try:
                client.sync_async(path).get(timeout=_READ_TIMEOUT)
                data, stat = client.get_async(path).get(timeout=_READ_TIMEOUT)
            except NoNodeError:
                return closed_at is not None
            except _FAILURES as exc:
                raise CoordinatorUnavailable(f"ZooKeeper at {self.hosts}: {exc!r}") from exc
            if int(stat.czxid) != int(epoch):
                return closed_at is not None
            # Still there: close its session, again if the holder's client won
            # a reconnection race and took the session back meanwhile.
            if closed_at is None or time.monotonic() - closed_at > 0.25:
                if not self._close_session(path, data, stat, deadline):
                    return closed_at is not None
                closed_at = time.monotonic()
            time.sleep(0.01)  # poll interval: the close is being applied
        raise CoordinatorUnavailable(f"{path} still present {timeout} s after closing its session")

    def _close_session(self, path: str, data: bytes, stat: Any, deadline: float) -> bool:
        """Attach to the session owning the znode and close it; False if that
        cannot be done (not ours to close, or the session already expired)."""
        owner = int(stat.ephemeralOwner)
        password = decode_value(data).get("session")
        if not isinstance(password, str):
            # Not written by this module: it cannot be evicted safely; it
            # goes when its session expires.
            log.warning("cannot evict %s: it records no session to close", path)
            return False
        holder = _Session(self.hosts, 1.0, client_id=(owner, bytes.fromhex(password)))
        holder.start(max(0.1, deadline - time.monotonic()))
        # A session that already expired cannot be attached: kazoo then opened
        # a new one, and the znode is gone or going with the old session.
        attached = holder.session_id == owner
        holder.stop()
        return attached

    # -- lifecycle --------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CoordinatorUnavailable(f"coordinator {self.url} is closed")

    def close(self) -> None:
        """Release every claim, cancel every watch, close the sessions; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            claims, watches, main = list(self._claims), list(self._watches), self._main
            self._main = None
        for w in watches:
            w.cancel()
        for c in claims:
            c.release()
        if main is not None:
            main.stop()

    def __enter__(self) -> ZooKeeperCoordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ZooKeeperCoordinator {self.url}>"
