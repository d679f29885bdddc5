"""``keepcount node`` as a real process: ready, counts, stops cleanly on SIGTERM."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from keepcount.nodeproc import free_port
from keepcount.stores import open_store


def request(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, data, {"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen[str], port: int, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"exited with {proc.returncode}: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "not ready in time"
        try:
            status, body = request(port, "GET", "/readyz")
        except OSError:  # not listening yet
            status, body = 0, None
        if status == 200:
            ready: dict[str, Any] = body
            return ready
        assert status in (0, 503), (status, body)
        time.sleep(0.01)  # poll interval: the loop waits for /readyz, not for time


def start(url: str, port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "keepcount.cli", "node", "--id", "n1", "--store", url,
         "--listen", f"127.0.0.1:{port}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip


@pytest.mark.g1
def test_node_serves_then_flushes_and_releases_on_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/counters.db"
    port = free_port()
    proc = start(url, port)
    try:
        ready = wait_ready(proc, port)
        assert ready["node"] == "n1" and ready["epoch"] == 1
        status, body = request(port, "POST", "/v1/counters/jobs_total/increment",
                               {"labels": {"queue": "mail"}, "by": 4})  # fmt: skip
        assert (status, body["value"], body["durable"]) == (200, 4, True)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = err.strip().splitlines()
    assert any(line.startswith("keepcount node n1: ready on http://127.0.0.1:") for line in lines)
    assert lines[-1] == "keepcount node n1: stopped; counters flushed, claim released", err
    store = open_store(url)
    try:
        assert store.load("n1").values == {"jobs_total": {'["mail"]': 4}}
        (record,) = store.nodes()
        assert record.node == "n1" and record.epoch == 1 and record.released_at is not None
    finally:
        store.close()


@pytest.mark.g6
def test_a_foreign_store_file_makes_the_node_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "foreign.db"
    path.write_bytes(b"not a database\n" * 100)
    proc = start(f"sqlite:///{path}", free_port())
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    assert "not an SQLite database" in err and "did not start" in err
    assert path.read_bytes() == b"not a database\n" * 100


@pytest.mark.g6
def test_bad_options_are_refused_before_anything_starts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/c.db"
    for extra, needle in ((["--listen", "nope:port"], "--listen"),
                          (["--max-body", "0"], "--max-body"),
                          (["--id", "bad id"], "node id")):  # fmt: skip
        argv = [sys.executable, "-m", "keepcount.cli", "node", "--id", "n1", "--store", url]
        out = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and needle in out.stderr, (extra, out.stderr)
    assert not (tmp_path / "c.db").exists()
