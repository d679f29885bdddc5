"""Config generation and parsing for the load balancers, without starting them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from keepcount.cluster.balancer import (
    Backend,
    BalancerConfigError,
    BalancerError,
    BalancerNotInstalled,
    LoadBalancer,
    check_backends,
    parse_listen,
)
from keepcount.cluster.balancers import make_balancer
from keepcount.cluster.haproxy import HAProxy, HAProxySettings
from keepcount.cluster.haproxy import render_config as haproxy_config
from keepcount.cluster.nginx import Nginx, NginxSettings
from keepcount.cluster.nginx import render_config as nginx_config

BACKENDS = [
    Backend("node-1.a", "127.0.0.1", 8101),
    Backend("node-1.b", "127.0.0.1", 8102),
    Backend("node-2.a", "127.0.0.1", 8103),
    Backend("node-2.b", "127.0.0.1", 8104),
]


def lines(config: str) -> list[str]:
    """The config's statements, stripped, comments dropped."""
    out = []
    for raw in config.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


# -- HAProxy ---------------------------------------------------------------------


def hap(settings: HAProxySettings | None = None, sock: str = "/run/kc/haproxy.sock") -> list[str]:
    return lines(
        haproxy_config(("127.0.0.1", 8100), BACKENDS, Path(sock), settings or HAProxySettings())
    )


@pytest.mark.g2
def test_haproxy_retries_replay_only_keyed_requests() -> None:
    cfg = hap()
    assert "retry-on conn-failure empty-response response-timeout 503" in cfg
    assert "retries 3" in cfg and "option redispatch 1" in cfg
    # Buffered bodies, or a retry has nothing to replay (INFRA.md).
    assert "option http-buffer-request" in cfg
    assert "acl keyed req.hdr(Idempotency-Key) -m found" in cfg
    assert "acl safe_method method GET HEAD OPTIONS" in cfg
    assert "http-request disable-l7-retry if !safe_method !keyed" in cfg


@pytest.mark.g3
def test_haproxy_routes_by_key_and_checks_readiness() -> None:
    cfg = hap()
    assert "balance hdr(Idempotency-Key)" in cfg and "hash-type consistent" in cfg
    assert "option httpchk GET /readyz" in cfg
    assert "http-check expect status 200" in cfg
    assert (
        "default-server inter 200ms fastinter 100ms downinter 200ms fall 2 rise 2"
        " observe layer4 error-limit 1 on-error mark-down"
    ) in cfg
    assert "timeout connect 300ms" in cfg and "timeout server 2000ms" in cfg
    assert "timeout check 1000ms" in cfg


def test_haproxy_backend_and_global_lines() -> None:
    cfg = hap()
    servers = [ln for ln in cfg if ln.startswith("server ")]
    assert servers == [
        "server node-1.a 127.0.0.1:8101 check",
        "server node-1.b 127.0.0.1:8102 check",
        "server node-2.a 127.0.0.1:8103 check",
        "server node-2.b 127.0.0.1:8104 check",
    ]
    assert "bind 127.0.0.1:8100" in cfg
    assert "stats socket /run/kc/haproxy.sock mode 600 level admin" in cfg
    assert "daemon" not in cfg
    # Only abnormal requests are logged, to stderr (the process's log file).
    assert "log stderr format raw local0 info" in cfg and "option dontlog-normal" in cfg


def test_haproxy_settings_are_written() -> None:
    cfg = hap(HAProxySettings(check_inter=0.15, fall=3, rise=1, retries=5, observe_layer4=False))
    assert "default-server inter 150ms fastinter 100ms downinter 200ms fall 3 rise 1" in cfg
    assert "retries 5" in cfg


@pytest.mark.parametrize(
    "kw", [{"fall": 0}, {"retries": -1}, {"check_inter": 0}, {"server_timeout": "2s"}]
)
def test_haproxy_invalid_settings_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(BalancerError):
        HAProxySettings(**kw)  # type: ignore[arg-type]


def test_haproxy_paths_are_quoted_without_expansion() -> None:
    # Single quotes: HAProxy expands $VAR and backslashes inside double quotes.
    cfg = hap(sock="/tmp/my dir/$HOME/haproxy.sock")
    assert "stats socket '/tmp/my dir/$HOME/haproxy.sock' mode 600 level admin" in cfg
    with pytest.raises(BalancerError, match="quote"):
        hap(sock="/tmp/it's/haproxy.sock")
    with pytest.raises(BalancerError, match="control"):
        hap(sock="/tmp/a\nb/haproxy.sock")


def test_haproxy_socket_moves_out_of_a_deep_directory(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    lb = HAProxy(deep, 8100, BACKENDS)
    try:
        assert len(str(lb.socket)) < 100 and lb.socket.name == "haproxy.sock"
        assert lb.config == deep / "haproxy.cfg"
    finally:
        lb.stop()  # never started: removes the socket's directory only
    assert not lb.socket.parent.exists()


def test_haproxy_backend_states_from_show_stat(monkeypatch: pytest.MonkeyPatch) -> None:
    lb = HAProxy("/nonexistent", 8100, BACKENDS)
    stat = (
        "# pxname,svname,qcur,status,check_status,\n"
        "keepcount_front,FRONTEND,,OPEN,,\n"
        "keepcount,node-1.a,0,UP,L7OK,\n"
        "keepcount,node-1.b,0,DOWN,L4CON,\n"
        "keepcount,node-2.a,0,UP 1/2,L7STS,\n"
        "keepcount,node-2.b,0,MAINT (resolution),,\n"
        "keepcount,BACKEND,0,UP,,\n"
        "\n"
    )
    monkeypatch.setattr(lb, "command", lambda line, timeout=2.0: stat)
    assert lb.backend_states() == {
        "node-1.a": "UP",
        "node-1.b": "DOWN",
        "node-2.a": "UP",
        "node-2.b": "MAINT",
    }
    rows = lb.show_stat()
    assert rows[2]["check_status"] == "L4CON"
    with pytest.raises(BalancerError, match="no backend server"):
        lb.set_server_state("node-9.a", "maint")
    with pytest.raises(BalancerError, match="ready, drain or maint"):
        lb.set_server_state("node-1.a", "up")  # type: ignore[arg-type]


# -- NGINX -----------------------------------------------------------------------


def ngx(settings: NginxSettings | None = None, *, root: bool = False) -> str:
    return nginx_config(
        ("127.0.0.1", 8100), 8199, BACKENDS, settings or NginxSettings(), run_as_root=root
    )


def block(config: str, start: str) -> list[str]:
    """The statements of the block that opens with ``start`` (one level deep)."""
    body = config[config.index(start) :]
    depth, end = 0, 0
    for i, ch in enumerate(body):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                end = i
                break
    return lines(body[:end])


@pytest.mark.g2
def test_nginx_non_idempotent_only_for_keyed_requests() -> None:
    cfg = ngx()
    keyed = block(cfg, "location /__keepcount_keyed/ {")
    assert "internal;" in keyed
    assert "proxy_pass http://keepcount$request_uri;" in keyed
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in keyed
    plain = block(cfg, "location / {")
    assert "proxy_next_upstream error timeout http_502 http_503;" in plain
    assert "rewrite ^ /__keepcount_keyed/ last;" in plain
    assert "if ($keepcount_keyed) {" in plain
    assert cfg.count("non_idempotent;") == 1
    # The key "0" is valid: the marker comes from a map, not from if's truthiness.
    assert 'map $http_idempotency_key $keepcount_keyed {\n        ""      0;' in cfg


def test_nginx_upstream_lines() -> None:
    up = block(ngx(), "upstream keepcount {")
    assert "hash $http_idempotency_key consistent;" in up
    assert "zone keepcount 64k;" in up
    assert [ln for ln in up if ln.startswith("server ")] == [
        f"server 127.0.0.1:{p} max_fails=1 fail_timeout=1s;" for p in (8101, 8102, 8103, 8104)
    ]
    assert "keepalive 32;" in up and "keepalive_timeout 4000ms;" in up
    assert "# node-1.a" in ngx()  # the names, as comments


def test_nginx_timeouts_tries_and_status() -> None:
    cfg = lines(ngx())
    assert "proxy_connect_timeout 300ms;" in cfg
    assert "proxy_read_timeout 2000ms;" in cfg
    assert "proxy_next_upstream_tries 4;" in cfg  # one per backend by default
    assert "proxy_next_upstream_timeout 5000ms;" in cfg
    assert "listen 127.0.0.1:8100;" in cfg and "listen 127.0.0.1:8199;" in cfg
    assert "stub_status;" in cfg
    tuned = lines(ngx(NginxSettings(tries=2, max_fails=3, fail_timeout=5, read_timeout=1.5)))
    assert "proxy_next_upstream_tries 2;" in tuned
    assert "proxy_read_timeout 1500ms;" in tuned
    assert "server 127.0.0.1:8101 max_fails=3 fail_timeout=5s;" in tuned


def test_nginx_everything_is_under_the_prefix() -> None:
    cfg = lines(ngx())
    assert "pid nginx.pid;" in cfg
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        assert f"{name}_temp_path temp/{name};" in cfg
    assert "error_log stderr warn;" in cfg
    assert not any("/var/" in ln for ln in cfg)
    assert "user root;" not in cfg and "user root;" in lines(ngx(root=True))


def test_nginx_backend_states_from_the_error_log(tmp_path: Path) -> None:
    lb = Nginx(tmp_path, 8100, BACKENDS, status_port=8199)
    lb.log.parent.mkdir(parents=True)
    now = time.strftime("%Y/%m/%d %H:%M:%S")
    old = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(time.time() - 60))

    def disabled(when: str, port: int) -> str:
        return (
            f"{when} [warn] 7#7: *5 upstream server temporarily disabled while connecting to "
            f'upstream, client: 127.0.0.1, server: , request: "POST /x HTTP/1.1", '
            f'upstream: "http://127.0.0.1:{port}/x", host: "127.0.0.1:8100"\n'
        )

    lb.log.write_text(
        disabled(old, 8101)
        + disabled(now, 8102)
        + f"{now} [error] 7#7: *5 connect() failed (111: Connection refused) while connecting"
        ' to upstream, upstream: "http://127.0.0.1:8103/x"\n'
        + disabled(now, 9999)  # not one of ours
        + disabled(now, 8104)[:50]  # a line still being written
    )
    assert lb.backend_states() == {
        "node-1.a": "UP",
        "node-1.b": "DOWN",
        "node-2.a": "UP",
        "node-2.b": "UP",
    }
    with lb.log.open("a") as f:
        f.write(disabled(now, 8104)[50:])
    assert lb.backend_states()["node-2.b"] == "DOWN"


# -- shared ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "host", "port"),
    [
        ("node 1", "127.0.0.1", 8101),
        ("node-1\nserver evil", "127.0.0.1", 8101),
        ("node;1", "127.0.0.1", 8101),
        ("", "127.0.0.1", 8101),
        ("n" * 65, "127.0.0.1", 8101),
        ("node-1.a", "127.0.0.1; evil", 8101),
        ("node-1.a", "::1", 8101),
        ("node-1.a", "127.0.0.1", 0),
        ("node-1.a", "127.0.0.1", 70000),
        ("node-1.a", "127.0.0.1", "8101"),
    ],
)
def test_invalid_backends_are_refused(name: str, host: str, port: int) -> None:
    with pytest.raises(BalancerConfigError):
        Backend(name, host, port)


def test_backend_lists_must_be_nonempty_and_unique() -> None:
    with pytest.raises(BalancerConfigError, match="at least one"):
        check_backends([])
    with pytest.raises(BalancerConfigError, match="name"):
        check_backends([Backend("a", "127.0.0.1", 1), Backend("a", "127.0.0.1", 2)])
    with pytest.raises(BalancerConfigError, match="address"):
        check_backends([Backend("a", "127.0.0.1", 1), Backend("b", "127.0.0.1", 1)])
    assert Backend("node-1.a", "localhost", 8101).address == "localhost:8101"


def test_parse_listen() -> None:
    assert parse_listen(8100) == ("127.0.0.1", 8100)
    assert parse_listen("8100") == ("127.0.0.1", 8100)
    assert parse_listen("127.0.0.2:8100") == ("127.0.0.2", 8100)
    assert parse_listen(("127.0.0.1", 8100)) == ("127.0.0.1", 8100)
    host, port = parse_listen(None)
    assert host == "127.0.0.1" and 0 < port < 65536
    for bad in ("x", "127.0.0.1:", "127.0.0.1:99999", "a b:80", 0):
        with pytest.raises(BalancerConfigError):
            parse_listen(bad)


def test_make_balancer(tmp_path: Path) -> None:
    for kind, cls in (("haproxy", HAProxy), ("nginx", Nginx)):
        lb = make_balancer(kind, tmp_path / kind, 8100, BACKENDS)
        assert isinstance(lb, cls) and isinstance(lb, LoadBalancer)
        assert lb.kind == kind and lb.url == "http://127.0.0.1:8100"
    with pytest.raises(BalancerConfigError, match="haproxy, nginx"):
        make_balancer("envoy", tmp_path, 8100, BACKENDS)
    with pytest.raises(TypeError):
        make_balancer("haproxy", tmp_path, 8100, BACKENDS, no_such_option=1)


@pytest.mark.parametrize("kind", ["haproxy", "nginx"])
def test_a_missing_binary_names_the_install_command(kind: str, tmp_path: Path) -> None:
    lb = make_balancer(kind, tmp_path, None, BACKENDS, binary=f"/nonexistent/{kind}")
    with pytest.raises(BalancerNotInstalled, match=f"apt-get install -y {kind}"):
        lb.start()
    lb.stop()  # never started: a no-op
