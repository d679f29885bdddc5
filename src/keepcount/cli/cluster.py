"""``keepcount cluster up|status|kill|restart|down``: a local cluster.

``up`` writes the cluster's spec to ``--dir`` and starts its supervisor
(``keepcount cluster supervise``, in a session of its own, logging to
``<dir>/supervisor.log``), which starts the coordinator, the load balancer
and the nodes and restarts failed nodes (``keepcount.cluster.supervisor``).
``up`` returns once every node is ready.  The other commands talk to the
supervisor's control API (its address is in the spec), so they work from
any shell.  ``down`` stops everything; if the supervisor itself is gone,
``down`` kills what is left of its process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from keepcount import httpclient
from keepcount.cli.extras import coordinator_modules, require
from keepcount.cluster.spec import (
    BALANCERS,
    CLAIM_TTL_RANGE,
    COORDINATORS,
    DEFAULT_CLAIM_TTL,
    DEFAULT_COORDINATOR,
    DEFAULT_LB,
    DEFAULT_NODES,
    DEFAULT_PORT,
    MAX_NODES,
    SPEC_FILE,
    ClusterSpec,
)
from keepcount.errors import InvalidInput
from keepcount.process import ManagedProcess, ProcessExited, wait_exit

__all__ = ["ClusterClient", "cluster"]

DEFAULT_DIR = Path("keepcount-cluster")
PID_FILE = "supervisor.pid"
LOG_FILE = "supervisor.log"

_dir_option = click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DIR, show_default=True, help="The cluster's directory (spec, data, logs).",
)  # fmt: skip


class ClusterClient:
    """The control API of a running cluster's supervisor (``keepcount.httpclient``)."""

    def __init__(self, directory: Path) -> None:
        self.spec = ClusterSpec.load(directory)
        self.directory = directory

    def call(
        self, method: str, path: str, body: Any = None, timeout: float = 90.0
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        spec = self.spec
        try:
            status, raw = httpclient.request(
                method, f"{spec.api_url}{path}", body=data, timeout=timeout,
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
        except OSError as exc:
            raise click.ClickException(
                f"the cluster's supervisor does not answer at {spec.api_url} ({exc}); "
                f"is it up? (`keepcount cluster up --dir {self.directory}`; "
                f"its log: {self.directory / LOG_FILE})"
            ) from None
        if status >= 400:
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {status}: {raw[:200].decode(errors='replace')}"
            raise click.ClickException(message)
        answer: dict[str, Any] = json.loads(raw)
        return answer

    def status(self, counters: bool = False) -> dict[str, Any]:
        return self.call("GET", "/api/status" + ("?counters=1" if counters else ""))

    def alive(self) -> bool:
        try:
            self.status()
        except click.ClickException:
            return False
        return True


@click.group()
def cluster() -> None:
    """A local cluster: N nodes behind HAProxy or NGINX, etcd or ZooKeeper, one store."""


@cluster.command()
@click.option(
    "--nodes", type=click.IntRange(1, MAX_NODES), default=DEFAULT_NODES, show_default=True
)
@click.option("--lb", type=click.Choice(BALANCERS), default=DEFAULT_LB, show_default=True)
@click.option(
    "--coordinator", type=click.Choice(COORDINATORS), default=DEFAULT_COORDINATOR,
    show_default=True,
)  # fmt: skip
@click.option("--store", default=None, metavar="URL",
              help="Store URL (default: sqlite:///DIR/counters.db, shared by the nodes), "
                   "'cassandra' (a local 3-node Apache Cassandra cluster under DIR) or "
                   "'bigtable' (a local Bigtable emulator).")  # fmt: skip
@_dir_option
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True,
              help="Load balancer port; the nodes' slots and the API take the ones after it. "
                   "0: free ports.")  # fmt: skip
@click.option("--claim-ttl", type=click.FloatRange(*CLAIM_TTL_RANGE), default=DEFAULT_CLAIM_TTL,
              show_default=True,
              help="Seconds a node's claim outlives its last renewal.")  # fmt: skip
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for every node to be ready.")  # fmt: skip
@click.option("--foreground", is_flag=True, help="Run the supervisor here until Ctrl-C.")
def up(
    nodes: int,
    lb: str,
    coordinator: str,
    store: str | None,
    directory: Path,
    port: int,
    claim_ttl: float,
    timeout: float,
    foreground: bool,
) -> None:
    """Start a cluster in --dir and wait until every node is ready."""
    store_modules = ("cassandra",) if (store or "").startswith("cassandra") else ()
    require("cluster up", "cluster", *coordinator_modules(coordinator), *store_modules)
    directory = directory.resolve()
    if (directory / SPEC_FILE).exists() and ClusterClient(directory).alive():
        raise click.ClickException(
            f"a cluster is already running in {directory}: `keepcount cluster down --dir {directory}`"
        )
    try:
        spec = ClusterSpec.allocate(
            directory, nodes=nodes, lb=lb, coordinator=coordinator, store=store,
            port=port or None, claim_ttl=claim_ttl,
        )  # fmt: skip
    except InvalidInput as exc:
        raise click.UsageError(str(exc)) from None
    spec.save()
    if foreground:
        click.echo(f"live page: {spec.api_url}/ui   (load balancer {spec.lb_url})", err=True)
        _supervise(spec)
        return
    supervisor = ManagedProcess("supervisor", directory / LOG_FILE, new_session=True)
    # A session of its own (its own process group): `down` can always clean up.
    supervisor.spawn(
        [sys.executable, "-m", "keepcount.cli", "cluster", "supervise", "--dir", str(directory)]
    )
    (directory / PID_FILE).write_text(f"{supervisor.pid}\n")
    client = ClusterClient(directory)
    click.echo(f"starting {nodes} nodes behind {lb}, coordinator {coordinator}, in {directory}")
    seen: list[dict[str, Any]] = []

    def ready() -> bool:
        with contextlib.suppress(click.ClickException):
            seen[:] = [client.status()]
            return bool(seen[0]["ready"])
        return False

    try:
        supervisor.wait_until(ready, timeout, interval=0.1)
    except ProcessExited:
        raise click.ClickException(
            f"the supervisor exited with {supervisor.returncode}:\n{_tail(directory / LOG_FILE)}"
        ) from None
    except TimeoutError:
        raise click.ClickException(
            f"not ready within {timeout:g} s; see {directory / LOG_FILE} "
            f"(`keepcount cluster down --dir {directory}` to clean up)"
        ) from None
    status = seen[0]
    _print_status(status)
    click.echo(
        f"\nlive page: {spec.api_url}/ui\n"
        f"load balancer: {spec.lb_url}   control API: {spec.api_url}\n"
        f"try: curl -X POST {spec.lb_url}/v1/counters/hits_total/increment "
        "-H 'Content-Type: application/json' -d '{}'"
    )


@cluster.command(hidden=True)
@_dir_option
def supervise(directory: Path) -> None:
    """Run the supervisor of the cluster in --dir (what `up` starts)."""
    _supervise(ClusterSpec.load(directory.resolve()))


def _supervise(spec: ClusterSpec) -> None:
    import logging

    from keepcount.cluster.supervisor import Supervisor

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    def show(ev: dict[str, Any]) -> None:
        fields = {k: v for k, v in ev.items() if k not in ("t", "mono", "event", "node", "seq")}
        who = f" {ev['node']}" if ev.get("node") else ""
        print(f"{time.strftime('%H:%M:%S')} {ev['event']}{who} {fields}", flush=True)

    sup = Supervisor(spec, on_event=show)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sup.stop)
        await sup.run()

    asyncio.run(main())
    if sup.failed is not None:
        raise SystemExit(1)


@cluster.command()
@_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw status document.")
def status(directory: Path, as_json: bool) -> None:
    """Nodes (state, epoch, restarts), the load balancer's view, the counters."""
    doc = ClusterClient(directory).status(counters=True)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    _print_status(doc)


@cluster.command()
@click.argument("node")
@click.option("--signal", "sig", type=click.Choice(["KILL", "STOP", "CONT", "TERM"],
              case_sensitive=False), default="KILL", show_default=True)  # fmt: skip
@_dir_option
def kill(node: str, sig: str, directory: Path) -> None:
    """Send a signal to NODE's process (CONT wakes its paused processes)."""
    answer = ClusterClient(directory).call("POST", f"/api/nodes/{node}/signal", {"signal": sig})
    click.echo(f"{node}: SIG{answer['signal']} sent to pid {', '.join(map(str, answer['pids']))}")


@cluster.command()
@click.argument("node")
@_dir_option
def restart(node: str, directory: Path) -> None:
    """Stop NODE gracefully and wait until its new incarnation is ready."""
    answer = ClusterClient(directory).call("POST", f"/api/nodes/{node}/restart")
    click.echo(f"{node}: incarnation {answer['incarnation']} ready (pid {answer['pid']})")


@cluster.command()
@_dir_option
@click.option("--timeout", type=float, default=60.0, show_default=True)
def down(directory: Path, timeout: float) -> None:
    """Stop the nodes, the load balancer and the coordinator."""
    directory = directory.resolve()
    client = ClusterClient(directory)
    pid_file = directory / PID_FILE
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    if client.alive():
        client.call("POST", "/api/down")
    if pid is not None:
        wait_exit(pid, timeout)  # its exit awaited (a pidfd), for at most `timeout`
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # whatever is left of its process group
        pid_file.unlink(missing_ok=True)
    click.echo(f"cluster in {directory} is down")


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _print_status(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    backends = doc.get("lb", {}).get("backends") or {}
    table = Table(title=f"cluster in {doc['directory']}", title_justify="left")
    for col in ("node", "state", "pid", "slot", "epoch", "incarnation", "restarts", "uptime", "lb"):
        table.add_column(col)
    for n in doc["nodes"]:
        slot = n.get("slot")
        table.add_row(
            n["id"],
            n["state"],
            str(n.get("pid", "")),
            slot or "",
            str(n.get("epoch") or ""),
            str(n.get("incarnation", "")),
            str(n["restarts"]),
            f"{n['uptime']:.1f} s" if "uptime" in n else "",
            str(backends.get(slot, "")) if slot else "",
        )
        for old in n.get("stale", []):
            table.add_row(
                "", f"old: {old['state']}", str(old["pid"]), old["slot"], "", "", "", "", ""
            )
    console.print(table)
    console.print(
        f"load balancer {doc['lb']['kind']} {doc['lb']['url']}; coordinator "
        f"{doc['coordinator']['kind']}; store {doc['store']}"
    )
    counters = doc.get("counters")
    if counters and counters.get("counters"):
        ct = Table(title="cluster totals", title_justify="left")
        for col in ("counter", "labels", "total", "per node"):
            ct.add_column(col)
        for c in counters["counters"]:
            if c["kind"] != "counter":
                continue
            labels = ",".join(f"{k}={v}" for k, v in c["labels"].items())
            nodes = " ".join(f"{k}:{v}" for k, v in c["nodes"].items())
            ct.add_row(c["name"], labels, str(c["value"]), nodes)
        console.print(ct)
