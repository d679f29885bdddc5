"""The membership of an etcd namespace: its claim keys listed, and watched.

Every claim is a key ``<prefix><node>`` whose ``create_revision`` is the
claim's epoch and whose value is the holder's info.  ``list_members`` reads
them all at one revision (a linearizable read); ``EtcdWatch`` lists, then
follows a watch stream from that revision, and starts over (through another
member if requests fail) whenever the stream ends, fails or goes quiet
without its member answering a probe.  A task on the coordinator's loop
reads etcd; a thread of the watch's own calls the callback with the latest
snapshot, so a slow callback never delays a renewal.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc  # type: ignore[import-untyped]
import grpc.aio  # type: ignore[import-untyped]
from aetcd import rpc  # type: ignore[import-untyped]
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from keepcount.coordination.base import Member, decode_info
from keepcount.coordination.etcd_channel import TRANSIENT, EtcdChannel, call

__all__ = ["EtcdWatch", "list_members", "member_of"]

log = logging.getLogger(__name__)

# etcd cancels a watch with this metadata when its member loses the leader,
# instead of leaving it silently stale.
_REQUIRE_LEADER = (("hasleader", "true"),)
_READ_TIMEOUT = 2.0
"""Deadline of a request made for a watch (list, probe)."""
_WATCH_PROBE = 3.0
"""A watch stream quiet for this long gets a probe read through its channel."""
_WATCH_BACKOFF = (0.05, 1.0)
"""Pause before a watch starts over: doubling from the first to the second
figure while it gets nowhere, back to the first once it delivered events."""


def _range_end(prefix: bytes) -> bytes:
    """The end of etcd's range for every key under ``prefix``."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def member_of(prefix: bytes, kv: Any) -> Member:
    """The member a claim key (an etcd ``KeyValue`` under ``prefix``) stands for."""
    node = bytes(kv.key)[len(prefix) :].decode(errors="replace")
    return Member(node, int(kv.create_revision), decode_info(bytes(kv.value)))


async def list_members(
    ch: EtcdChannel, prefix: bytes, limit: float
) -> tuple[dict[str, Member], int]:
    """Every member under ``prefix`` and the revision read at (one attempt
    of at most ``limit`` seconds; loop thread)."""
    got = await call(
        ch.kv.Range(
            rpc.RangeRequest(key=prefix, range_end=_range_end(prefix)),
            timeout=limit,
            wait_for_ready=True,
        )
    )
    members = {m.node: m for m in (member_of(prefix, kv) for kv in got.kvs)}
    return members, int(got.header.revision)


class _WatchEnded(Exception):
    """A watch stream ended (or failed) before it delivered any event."""


class EtcdWatch:
    """A membership watch: a task on the coordinator's loop reads etcd, a
    thread of its own calls the callback with the latest snapshot.
    ``forget(watch)`` is called once, when it is cancelled."""

    def __init__(
        self,
        ch: EtcdChannel,
        prefix: bytes,
        callback: Callable[[dict[str, Member]], None],
        forget: Callable[[EtcdWatch], None],
    ) -> None:
        self._ch = ch
        self._prefix = prefix
        self._callback = callback
        self._forget = forget
        self._cond = threading.Condition()
        self._pending: dict[str, Member] | None = None
        self._cancelled = False
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(
            target=self._dispatch, name="keepcount-etcd-watch", daemon=True
        )
        self._thread.start()

    def start(self) -> None:
        """Start reading etcd (blocking; not from the loop thread)."""

        async def start() -> None:
            self._task = asyncio.create_task(self._follow(), name="etcd watch")

        self._ch.submit(start(), 5.0)

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
        self._forget(self)
        task = self._task
        if task is not None:
            self._ch.call_soon(task.cancel)
        if threading.current_thread() is not self._thread:
            self._thread.join(10)

    async def _follow(self) -> None:
        """Follow the membership for good: each round retries (tenacity,
        backoff ``_WATCH_BACKOFF``) until a stream delivered events, then the
        next round starts over from the shortest pause."""
        first, most = _WATCH_BACKOFF
        while True:
            await AsyncRetrying(
                retry=retry_if_exception_type(_WatchEnded),
                wait=wait_exponential(multiplier=first, max=most),
            )(self._once)
            await asyncio.sleep(first)

    async def _once(self) -> None:
        """List, then follow a watch stream from the listed revision until it
        ends; on a request failure, fail over to another member.  Returns if
        the stream delivered events, else raises ``_WatchEnded``."""
        prefix, end = self._prefix, _range_end(self._prefix)
        generation = self._ch.generation
        delivered = False
        try:
            members, revision = await list_members(self._ch, prefix, _READ_TIMEOUT)
            self.offer(dict(members))
            stream = self._ch.watch.Watch(metadata=_REQUIRE_LEADER)
            probe = asyncio.create_task(self._probe(stream))
            try:
                await call(
                    stream.write(
                        rpc.WatchRequest(
                            create_request=rpc.WatchCreateRequest(
                                key=prefix, range_end=end, start_revision=revision + 1
                            )
                        )
                    )
                )
                while True:
                    reply = await call(stream.read())
                    if reply is grpc.aio.EOF or reply.canceled or reply.compact_revision:
                        break
                    if not reply.events:
                        continue
                    for event in reply.events:
                        if event.type == rpc.Event.DELETE:
                            node = bytes(event.kv.key)[len(prefix) :].decode(errors="replace")
                            members.pop(node, None)
                        else:
                            m = member_of(prefix, event.kv)
                            members[m.node] = m
                    self.offer(dict(members))
                    delivered = True
            finally:
                probe.cancel()
                stream.cancel()
        except TRANSIENT as exc:
            log.debug("etcd watch interrupted: %r", exc)
            await self._ch.failover(generation)
        if not delivered:
            raise _WatchEnded

    async def _probe(self, stream: Any) -> None:
        """While a watch stream is quiet, check now and then that its member
        still answers; if not, cancel the stream so the watch starts over."""
        while True:
            await asyncio.sleep(_WATCH_PROBE)
            try:
                await call(
                    self._ch.kv.Range(
                        rpc.RangeRequest(key=self._prefix, limit=1), timeout=_READ_TIMEOUT
                    )
                )
            except TRANSIENT:
                stream.cancel()
                return
