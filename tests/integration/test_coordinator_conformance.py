"""One suite, every coordinator backend: the Coordinator contract against real servers.

``coordinator_url`` is an etcd 3-member cluster or a standalone ZooKeeper,
each started once per session, with a fresh namespace per test.  Tests that
pause or kill servers get private ones (``private_servers``).  Timing
assertions are orderings and generous bounds: the machine is shared.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import coordinators
import pytest
from coordinators import Backend, Holder, Recorder, Servers, wait_for

from keepcount.cluster.etcd import EtcdCluster
from keepcount.cluster.zookeeper import ZooKeeperEnsemble
from keepcount.coordination import open_coordinator
from keepcount.coordination.base import Coordinator, margin
from keepcount.errors import (
    ClaimConflict,
    CoordinatorUnavailable,
    InvalidInput,
    KeepcountError,
)
from keepcount.nodeproc import free_port

pytestmark = pytest.mark.g4
etcd_cluster = coordinators.etcd_cluster
zookeeper_server = coordinators.zookeeper_server
backend = coordinators.backend
namespace = coordinators.namespace
coordinator_url = coordinators.coordinator_url
coordinator = coordinators.coordinator
other = coordinators.other
private_servers = coordinators.private_servers
holders = coordinators.holders

INFO = {"url": "http://127.0.0.1:8101", "pid": "4242", "host": "test-host"}
StartHolder = Callable[[str, str, float], Holder]


# -- claims -----------------------------------------------------------------------


def test_claim_returns_an_epoch_and_is_trusted(coordinator: Coordinator) -> None:
    before = time.monotonic()
    claim = coordinator.claim("node-1", INFO)
    assert claim.node == "node-1"
    assert isinstance(claim.epoch, int) and claim.epoch > 0
    assert claim.ttl >= 2.0
    assert claim.trusted() and not claim.lost
    # The deadline counts from a send time after `before`, minus the margin.
    assert before + claim.ttl - margin(claim.ttl) <= claim.deadline()
    assert claim.deadline() <= time.monotonic() + claim.ttl - margin(claim.ttl)
    member = coordinator.members()["node-1"]
    assert (member.node, member.epoch, member.info) == ("node-1", claim.epoch, INFO)


def test_a_held_id_cannot_be_claimed_again(coordinator: Coordinator, other: Coordinator) -> None:
    claim = coordinator.claim("node-1", INFO)
    with pytest.raises(ClaimConflict) as raised:
        other.claim("node-1", {"url": "http://127.0.0.1:9999"})
    message = str(raised.value)
    assert "node-1" in message and INFO["url"] in message and str(claim.epoch) in message
    with pytest.raises(ClaimConflict):
        coordinator.claim("node-1")  # the same coordinator is no exception
    assert claim.trusted()
    assert other.members()["node-1"].epoch == claim.epoch


def test_release_then_claim_again_gives_a_higher_epoch(
    coordinator: Coordinator, other: Coordinator
) -> None:
    first = coordinator.claim("node-1", INFO)
    first.release()
    assert first.lost and not first.trusted()
    assert first.deadline() == -math.inf
    assert first.wait_lost(0)
    first.release()  # idempotent
    assert "node-1" not in other.members()
    second = other.claim("node-1", INFO)
    assert second.epoch > first.epoch
    assert other.members()["node-1"].epoch == second.epoch


def test_epochs_grow_across_node_ids_and_incarnations(coordinator: Coordinator) -> None:
    epochs = []
    for _ in range(3):
        c = coordinator.claim("node-1")
        epochs.append(c.epoch)
        c.release()
    assert epochs == sorted(epochs) and len(set(epochs)) == 3


def test_close_releases_every_claim(coordinator_url: str, other: Coordinator) -> None:
    c = open_coordinator(coordinator_url)
    claims = [c.claim(f"node-{i}") for i in range(3)]
    assert set(other.members()) == {"node-0", "node-1", "node-2"}
    c.close()
    assert all(cl.lost and not cl.trusted() for cl in claims)
    assert other.members() == {}
    c.close()  # idempotent
    with pytest.raises(CoordinatorUnavailable):
        c.claim("node-9")


def test_renewals_keep_a_claim_trusted_while_the_caller_is_busy(coordinator: Coordinator) -> None:
    """Renewal runs on the coordinator's own thread: a CPU-bound caller (a
    saturated event loop) does not starve it."""
    claim = coordinator.claim("node-1")
    start = claim.deadline()
    end = time.monotonic() + 2 * claim.ttl
    untrusted = 0
    while time.monotonic() < end:
        sum(i * i for i in range(20_000))  # hold the GIL as a busy event loop would
        untrusted += not claim.trusted()
    assert untrusted == 0
    assert claim.deadline() > start + claim.ttl  # renewals went on


# -- membership ---------------------------------------------------------------------


def test_watch_sees_claims_and_releases(coordinator: Coordinator, other: Coordinator) -> None:
    rec = Recorder()
    w = coordinator.watch(rec)
    try:
        rec.wait(lambda m: m == {}, 10, "the empty namespace")
        claim = other.claim("node-1", INFO)
        i, _, members = rec.wait(lambda m: "node-1" in m, 10, "the claim")
        assert members["node-1"].epoch == claim.epoch and members["node-1"].info == INFO
        claim.release()
        rec.wait(lambda m: "node-1" not in m, 10, "the release", since=i + 1)
    finally:
        w.cancel()
    assert rec.overlaps == 0, "callback ran concurrently with itself"
    assert threading.get_ident() not in rec.threads
    # After cancel() returned no call starts: a second watch sees a change the
    # cancelled one must not.
    calls = len(rec)
    rec2 = Recorder()
    w2 = coordinator.watch(rec2)
    try:
        other.claim("node-2")
        rec2.wait(lambda m: "node-2" in m, 10, "node-2")
    finally:
        w2.cancel()
    w.cancel()  # idempotent
    assert len(rec) == calls


def test_watch_starts_with_the_whole_membership(
    coordinator: Coordinator, other: Coordinator
) -> None:
    claims = [other.claim(f"node-{i}", {"i": str(i)}) for i in range(3)]
    rec = Recorder()
    w = coordinator.watch(rec)
    try:
        _, _, first = rec.wait(lambda m: True, 10, "a first snapshot")
    finally:
        w.cancel()
    assert {n: m.epoch for n, m in first.items()} == {c.node: c.epoch for c in claims}


def test_a_killed_holders_claim_expires_and_the_id_is_free_again(
    coordinator: Coordinator, coordinator_url: str, holders: StartHolder
) -> None:
    rec = Recorder()
    w = coordinator.watch(rec)
    holder = holders(coordinator_url, "node-k", 1.0)
    epoch, ttl = holder.claimed()
    try:
        i, _, members = rec.wait(lambda m: "node-k" in m, 10, "the holder's claim")
        assert members["node-k"].epoch == epoch
        assert members["node-k"].info["pid"] == str(holder.pid)
        killed = time.monotonic()
        holder.kill()
        _, gone, _ = rec.wait(lambda m: "node-k" not in m, ttl + 5.0, "the expiry", since=i + 1)
    finally:
        w.cancel()
    # The coordinator kept it at least until the last renewal + ttl, and let
    # it go within a generous bound after that.
    vanished = gone - killed
    print(f"claim of a SIGKILLed holder vanished {vanished:.2f} s after the kill (ttl {ttl})")
    assert vanished <= ttl + 5.0
    again = coordinator.claim("node-k", INFO)
    assert again.epoch > epoch


# -- eviction ---------------------------------------------------------------------


def test_evict_deletes_only_at_the_current_epoch(
    coordinator: Coordinator, other: Coordinator
) -> None:
    claim = coordinator.claim("node-1", INFO)
    assert other.evict("node-1", claim.epoch - 1) is False
    assert other.evict("node-1", claim.epoch + 1) is False
    assert other.evict("node-2", claim.epoch) is False  # nothing there
    assert claim.trusted() and other.members()["node-1"].epoch == claim.epoch
    assert other.evict("node-1", claim.epoch) is True
    assert "node-1" not in other.members()
    # A holder that was in fact alive learns it lost the claim.
    assert claim.wait_lost(10), claim
    assert not claim.trusted()
    successor = other.claim("node-1", INFO)
    assert successor.epoch > claim.epoch
    # The old epoch no longer matches anything: the successor is safe.
    assert coordinator.evict("node-1", claim.epoch) is False
    assert successor.trusted() and other.members()["node-1"].epoch == successor.epoch


def test_evicting_a_killed_holder_frees_the_id_at_once(
    coordinator: Coordinator, coordinator_url: str, holders: StartHolder
) -> None:
    holder = holders(coordinator_url, "node-e", 2.0)
    epoch, _ = holder.claimed()
    holder.kill()  # the failure detector evicts only after it reaped the process
    assert coordinator.evict("node-e", epoch) is True
    again = coordinator.claim("node-e")
    assert again.epoch > epoch


# -- pauses and outages -------------------------------------------------------------


def test_a_paused_holder_is_untrusted_the_moment_it_continues(
    coordinator: Coordinator, coordinator_url: str, holders: StartHolder
) -> None:
    holder = holders(coordinator_url, "node-p", 1.0)
    epoch, ttl = holder.claimed()
    wait_for(lambda: holder.state().trusted, 10, "the holder trusting its claim")
    rec = Recorder()
    w = coordinator.watch(rec)
    try:
        i, _, _ = rec.wait(lambda m: m.get("node-p") is not None, 10, "the claim")
        holder.pause()
        paused = time.monotonic()
        _, gone, _ = rec.wait(lambda m: "node-p" not in m, ttl + 10, "the expiry", since=i + 1)
    finally:
        w.cancel()
    print(f"a SIGSTOPped holder's claim vanished {gone - paused:.2f} s after the stop")
    holder.resume()
    state = holder.state()  # the first thing it does on waking
    assert not state.trusted, f"continued holder still trusts its claim: {state}"
    assert state.left < 0
    wait_for(lambda: holder.state().lost, 15, "the holder learning its claim is lost")
    assert coordinator.claim("node-p").epoch > epoch


def test_trust_ends_before_expiry_when_the_coordinator_is_unreachable(
    private_servers: Servers, namespace: str
) -> None:
    url = private_servers.url_for(namespace)
    c = open_coordinator(url)
    try:
        claim = c.claim("node-u", INFO)
        ttl = claim.ttl
        first = claim.deadline()
        wait_for(lambda: claim.deadline() > first, 5, "a renewal")
        private_servers.pause_all()
        paused = time.monotonic()
        last = claim.deadline()
        while claim.trusted():
            last = claim.deadline()
            assert time.monotonic() - paused < ttl + 2, "still trusted long after the outage"
            time.sleep(0.005)  # poll interval
        untrusted = time.monotonic()
        print(f"trusted() turned False {untrusted - paused:.2f} s after the pause (ttl {ttl})")
        # No renewal can have been sent after the pause: the deadline is at most
        # pause + ttl - margin, i.e. before the coordinator could expire it.
        assert last <= paused + ttl - margin(ttl)
        assert untrusted >= last
        assert not claim.lost, "nobody said the claim is gone: it is untrusted, not lost"
        # Hold the outage past the coordinator's own expiry (a fault's duration,
        # not a synchronisation), so the servers find the claim expired.
        time.sleep(max(0.0, paused + ttl + 1.0 - time.monotonic()))
        assert not claim.trusted() and not claim.lost
        private_servers.resume_all()
        private_servers.wait_ready()
        # Back: the lease / session either survived (trusted again) or not (lost).
        wait_for(lambda: claim.lost or claim.trusted(), 20, "a verdict after the outage")
        print(f"after the outage the claim is {'lost: ' + str(claim) if claim.lost else 'trusted'}")
        with open_coordinator(url) as fresh:
            if claim.lost:
                assert fresh.claim("node-u").epoch > claim.epoch
            else:
                with pytest.raises(ClaimConflict):
                    fresh.claim("node-u")
    finally:
        c.close()


@pytest.mark.parametrize("kind", coordinators.BACKENDS)
def test_losing_one_member_of_three_keeps_claims_trusted(
    kind: str, tmp_path: Path, namespace: str
) -> None:
    """etcd cluster / ZooKeeper ensemble of 3: a follower dies (the etcd
    client's first endpoint: a failover), then the leader."""
    coordinators.require(kind)
    servers: EtcdCluster | ZooKeeperEnsemble
    if kind == "etcd":
        servers = EtcdCluster(tmp_path / "etcd", members=3)
    else:
        servers = ZooKeeperEnsemble(tmp_path / "zookeeper", members=3)
    try:
        servers.start()
        leader = servers.leader()
        follower = (leader + 1) % 3
        if isinstance(servers, EtcdCluster):
            url = servers.url_for(namespace, first=follower)
        else:
            url = servers.url_for(namespace)
        with open_coordinator(url) as c:
            claim = c.claim("node-1", INFO)
            servers.kill(follower)
            killed = time.monotonic()
            untrusted = 0
            while time.monotonic() < killed + 3 * claim.ttl:
                untrusted += not claim.trusted()
                time.sleep(0.01)  # sampling interval
            assert untrusted == 0 and not claim.lost, claim
            assert claim.deadline() > killed + claim.ttl - margin(claim.ttl)  # renewed since
            assert c.claim("node-2").epoch > claim.epoch
            assert set(c.members()) == {"node-1", "node-2"}
            # Then the leader (2 of 3 left: a quorum once one is elected).
            servers.restart(follower)
            leader = servers.leader()
            servers.kill(leader)
            killed = time.monotonic()
            wait_for(lambda: claim.deadline() > killed + 0.5, 15, "a renewal after the election")
            print(f"{kind}: leader killed, claim {claim}")
            assert not claim.lost and claim.trusted(), claim
            assert c.claim("node-3").epoch > claim.epoch
    finally:
        print(f"\n=== {kind} logs (tail) ===\n{servers.logs(3000)}")
        servers.stop()


def test_claim_without_a_server_is_unavailable(backend: Backend) -> None:
    url = f"{backend.kind}://127.0.0.1:{free_port()}/nowhere"
    with open_coordinator(url) as c:
        started = time.monotonic()
        with pytest.raises(CoordinatorUnavailable):
            c.claim("node-1", timeout=1.0)
        assert time.monotonic() - started < 5.0
        with pytest.raises(CoordinatorUnavailable):
            c.members(timeout=0.5)
        with pytest.raises(CoordinatorUnavailable):
            c.evict("node-1", 1, timeout=0.5)
        assert time.monotonic() - started < 8.0


# -- bad input ----------------------------------------------------------------------


@pytest.mark.g6
@pytest.mark.parametrize("node", ["", "-x", "a/b", "a b", "x" * 64, "ü", "../up", None, 7])
def test_invalid_node_ids_are_refused(coordinator: Coordinator, node: object) -> None:
    with pytest.raises(InvalidInput):
        coordinator.claim(node)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        coordinator.evict(node, 1)  # type: ignore[arg-type]


@pytest.mark.g6
def test_invalid_claim_arguments_are_refused(coordinator: Coordinator) -> None:
    for ttl in (0, -1, math.nan, math.inf, True):
        with pytest.raises(InvalidInput):
            coordinator.claim("node-1", ttl=ttl)
    with pytest.raises(InvalidInput):
        coordinator.claim("node-1", {"pid": 7})  # type: ignore[dict-item]
    assert coordinator.members() == {}


@pytest.mark.g6
@pytest.mark.parametrize(
    "url",
    ["etcd://", "etcd:///ns", "etcd://h:0", "etcd://h:99999", "zookeeper://h:2181/a/b",
     "consul://h:8500", "etcd://h:2379?x=1", "etcd://user@h:2379", "etcd://::1:2379",
     "etcd://h:2379,h:2379", "not a url"],
)  # fmt: skip
def test_invalid_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        open_coordinator(url)
    assert isinstance(raised.value, KeepcountError)
    assert "coordinator URL" in str(raised.value)
