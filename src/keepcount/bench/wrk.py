"""Drive an HTTP endpoint with wrk (a C load generator) and parse what it says.

A Python client tops out at a few hundred requests per second on this
machine (docs/infra.md), far below the server; wrk does not.  Each request is a
POST of one of a few JSON bodies, picked round-robin by a Lua script, and
optionally carries an ``Idempotency-Key`` unique to the request (prefix,
wrk thread, sequence number).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from keepcount.bench.result import BenchError

__all__ = ["WrkRun", "require_wrk", "run_wrk"]

_INSTALL = "apt-get install -y wrk   (or: scripts/setup.sh)"

# wrk runs setup() once per thread in its main Lua state, then each thread
# runs request() in a state of its own: ``tid`` is set into that state.
_SCRIPT = """
local bodies = {%(bodies)s}
local path = %(path)s
local key_prefix = %(key_prefix)s
local headers = {["Content-Type"] = "application/json"}
local i = 0
local seq = 0
local threads = 0
tid = 0
setup = function(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
request = function()
  i = i %% #bodies + 1
  if key_prefix then
    seq = seq + 1
    headers["Idempotency-Key"] = key_prefix .. tid .. "-" .. seq
  end
  return wrk.format("POST", path, headers, bodies[i])
end
done = function(summary, latency, requests)
  io.write(string.format("KEEPCOUNT %%d %%d %%d %%d %%d %%d %%d\\n",
    summary.requests, summary.duration, summary.errors.connect + summary.errors.read
      + summary.errors.write + summary.errors.timeout, summary.errors.status,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True, slots=True)
class WrkRun:
    requests: int
    """Responses received (any status)."""
    seconds: float
    socket_errors: int
    non_2xx: int
    p50_ms: float
    p99_ms: float

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx

    @property
    def per_s(self) -> float:
        return self.ok / self.seconds


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise BenchError(f"the HTTP benchmark needs wrk; install it with: {_INSTALL}")
    return path


def run_wrk(
    url: str,
    path: str,
    bodies: list[str],
    *,
    connections: int,
    threads: int,
    duration: float,
    workdir: Path,
    key_prefix: str | None = None,
) -> WrkRun:
    """One wrk run of ``duration`` seconds (wrk's own bound; also a timeout here)."""
    wrk = require_wrk()
    script = workdir / "keepcount-bench.lua"
    # A JSON string is a valid Lua string literal (ASCII, the usual escapes).
    script.write_text(
        _SCRIPT
        % {
            "bodies": ", ".join(json.dumps(b) for b in bodies),
            "path": json.dumps(path),
            "key_prefix": "nil" if key_prefix is None else json.dumps(key_prefix),
        }
    )
    seconds = max(1, round(duration))
    cmd = [
        wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
        "-s", str(script), url,
    ]  # fmt: skip
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {exc}") from exc
    match = re.search(r"^KEEPCOUNT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)$", out.stdout, re.M)
    if out.returncode != 0 or match is None:
        raise BenchError(
            f"wrk failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}"
        )
    requests, micros, sock_err, status_err, p50, p99, _max = (int(g) for g in match.groups())
    return WrkRun(requests, micros / 1e6, sock_err, status_err, p50 / 1e3, p99 / 1e3)
