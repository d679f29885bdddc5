"""Coordinator URLs, and the local claim arithmetic every backend shares."""

from __future__ import annotations

import math
import time

import pytest

from keepcount.coordination import (
    DEFAULT_NAMESPACE,
    CoordinatorURL,
    open_coordinator,
    parse_coordinator_url,
)
from keepcount.coordination.base import (
    MIN_MARGIN,
    ClaimState,
    Member,
    check_ttl,
    decode_info,
    describe_holder,
    encode_info,
    margin,
    renew_interval,
)
from keepcount.errors import InvalidInput


@pytest.mark.parametrize(
    ("url", "scheme", "endpoints", "namespace"),
    [
        ("etcd://127.0.0.1:2379", "etcd", [("127.0.0.1", 2379)], DEFAULT_NAMESPACE),
        ("etcd://127.0.0.1:2379/", "etcd", [("127.0.0.1", 2379)], DEFAULT_NAMESPACE),
        (
            "etcd://127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793/shop",
            "etcd",
            [("127.0.0.1", 23791), ("127.0.0.1", 23792), ("127.0.0.1", 23793)],
            "shop",
        ),
        ("etcd://etcd-1.internal/a_b.c-d", "etcd", [("etcd-1.internal", 2379)], "a_b.c-d"),
        ("etcd://[::1]:2379,[::1]:2380/x", "etcd", [("::1", 2379), ("::1", 2380)], "x"),
        ("etcd://[::1]/x", "etcd", [("::1", 2379)], "x"),
        ("zookeeper://localhost", "zookeeper", [("localhost", 2181)], DEFAULT_NAMESPACE),
        (
            "zookeeper://127.0.0.1:2181,127.0.0.2:2182/ns1",
            "zookeeper",
            [("127.0.0.1", 2181), ("127.0.0.2", 2182)],
            "ns1",
        ),
    ],
)
def test_valid_urls(
    url: str, scheme: str, endpoints: list[tuple[str, int]], namespace: str
) -> None:
    parsed = parse_coordinator_url(url)
    assert parsed == CoordinatorURL(scheme, tuple(endpoints), namespace)
    assert parsed.prefix == f"/keepcount/{namespace}/nodes"
    assert parse_coordinator_url(str(parsed)) == parsed  # round trip


def test_hostports_bracket_ipv6() -> None:
    parsed = parse_coordinator_url("zookeeper://[::1]:2181,127.0.0.1:2182")
    assert parsed.hostports() == ["[::1]:2181", "127.0.0.1:2182"]


@pytest.mark.g6
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "expected scheme://"),
        ("127.0.0.1:2379", "expected scheme://"),
        ("consul://127.0.0.1:8500", "unknown scheme 'consul'"),
        ("ETCD://127.0.0.1", "unknown scheme"),
        ("etcd://", "no host"),
        ("etcd:///ns", "no host"),
        ("etcd://h1,,h2", "empty host"),
        ("etcd://h:0", "port '0'"),
        ("etcd://h:65536", "port '65536'"),
        ("etcd://h:abc", "port 'abc'"),
        ("etcd://h:", "port ''"),
        ("etcd://::1:2379", "must be in brackets"),
        ("etcd://[::1", "unclosed"),
        ("etcd://[nope]:1", "not an IPv6 address"),
        ("etcd://[::1]x", "unexpected"),
        ("etcd://bad_host:2379", "not a host name"),
        ("etcd://h:2379/a/b", "namespace 'a/b'"),
        ("etcd://h:2379/-x", "namespace '-x'"),
        ("etcd://h:2379/" + "n" * 64, "namespace"),
        ("etcd://h:2379?timeout=1", "query strings"),
        ("etcd://h:2379#frag", "query strings"),
        ("etcd://user:pw@h:2379", "credentials"),
        ("etcd://h:2379,h:2379", "listed twice"),
    ],
)
def test_invalid_urls_say_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        parse_coordinator_url(url)
    message = str(raised.value)
    assert says in message
    assert "invalid coordinator URL" in message and "e.g." in message


@pytest.mark.g6
@pytest.mark.parametrize("url", [None, 2379, b"etcd://h"])
def test_non_strings_are_invalid(url: object) -> None:
    with pytest.raises(InvalidInput):
        parse_coordinator_url(url)  # type: ignore[arg-type]


@pytest.mark.g6
def test_open_coordinator_refuses_bad_urls_before_connecting() -> None:
    with pytest.raises(InvalidInput):
        open_coordinator("redis://127.0.0.1:6379")


@pytest.mark.parametrize("url", ["etcd://127.0.0.1:1/ns", "zookeeper://127.0.0.1:1/ns"])
def test_open_coordinator_does_not_contact_the_server(url: str) -> None:
    started = time.monotonic()
    c = open_coordinator(url)
    try:
        assert c.url == url
    finally:
        c.close()
        c.close()  # idempotent
    assert time.monotonic() - started < 2.0


# -- the arithmetic of a claim ----------------------------------------------------


@pytest.mark.g4
def test_margin_and_renewal_interval() -> None:
    assert margin(2.0) == 0.5
    assert margin(0.4) == MIN_MARGIN
    assert renew_interval(2.0) == 0.5
    # Two renewals in a row may fail before trust ends.
    for ttl in (1.0, 2.0, 10.0):
        assert ttl - margin(ttl) >= 3 * renew_interval(ttl)


@pytest.mark.g4
def test_claim_state_deadline_counts_from_the_send_time() -> None:
    sent = time.monotonic()
    c = ClaimState("node-1", 7, 2.0, sent)
    assert c.deadline() == sent + 2.0 - margin(2.0)
    assert c.trusted() and not c.lost
    c.renewed(sent + 0.5, 2.0)
    assert c.deadline() == sent + 0.5 + 2.0 - margin(2.0)
    c.renewed(sent + 0.1, 2.0)  # a late answer to an older renewal moves nothing back
    assert c.deadline() == sent + 0.5 + 2.0 - margin(2.0)


@pytest.mark.g4
def test_claim_state_is_untrusted_once_the_deadline_passed() -> None:
    c = ClaimState("node-1", 7, 1.0, time.monotonic() - 1.0)  # last renewal 1 s ago
    assert not c.trusted() and not c.lost


@pytest.mark.g4
def test_claim_state_loss_is_final() -> None:
    c = ClaimState("node-1", 7, 2.0, time.monotonic())
    assert c.mark_lost("its lease expired") is True
    assert c.mark_lost("again") is False
    assert c.reason == "its lease expired"
    assert c.lost and not c.trusted() and c.deadline() == -math.inf
    assert c.wait_lost(0)
    c.renewed(time.monotonic(), 2.0)
    assert not c.trusted()


@pytest.mark.g4
def test_claim_state_release_is_idempotent() -> None:
    calls = []

    class Released(ClaimState):
        def _release_remote(self) -> None:
            calls.append(self.node)

    c = Released("node-1", 7, 2.0, time.monotonic())
    c.release()
    c.release()
    assert calls == ["node-1"] and c.reason == "released" and not c.trusted()


@pytest.mark.g6
@pytest.mark.parametrize("ttl", [0, -1.0, math.nan, math.inf, 3601, True, "2"])
def test_bad_ttls(ttl: object) -> None:
    with pytest.raises(InvalidInput):
        check_ttl(ttl)  # type: ignore[arg-type]


def test_info_round_trip_and_foreign_values() -> None:
    info = {"url": "http://127.0.0.1:8101", "pid": "1"}
    assert decode_info(encode_info(info, session="ab")) == info
    for raw in (None, b"", b"not json", b"[1]", b'{"info": 3}'):
        assert decode_info(raw) == {}


def test_conflict_message_names_the_holder() -> None:
    message = describe_holder("node-1", Member("node-1", 42, {"url": "http://h:1", "pid": "9"}))
    assert "node-1" in message and "42" in message and "url=http://h:1" in message
    assert "pid=9" in message


# -- the servers' process managers name the install command ------------------------


def test_missing_etcd_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from keepcount.cluster import etcd

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="apt-get install -y etcd-server etcd-client"):
        etcd.etcd_binary()


def test_missing_zookeeper_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from keepcount.cluster import zookeeper

    monkeypatch.setattr(zookeeper, "_JARS", ("/nonexistent/zookeeper.jar",))
    with pytest.raises(FileNotFoundError, match="apt-get install -y zookeeper"):
        zookeeper.zookeeper_classpath()
