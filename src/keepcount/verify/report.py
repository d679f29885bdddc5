"""The report of a ``keepcount verify`` run: results, plots, one HTML page.

Written into the run's directory beside ``history.jsonl``:

- ``results.json``: every checker's result and the run's settings;
- ``throughput.png``: acknowledged increments per second, and latency p50 /
  p99 per second, over time, fault windows shaded;
- ``nodes.png``: each node's own value of the counter over time (from its
  ``/metrics``), across its restarts (a marker where its pid changed);
- ``tally.png``: per label set, acknowledged vs acknowledged + unknown vs
  the final stored total;
- ``report.html``: all of it, escaped, readable without a server.
"""

from __future__ import annotations

import html
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keepcount.verify.history import Op
from keepcount.verify.verdict import Fault, Result

__all__ = ["write_report"]

_COLORS = {"kill": "#d62728", "pause": "#ff7f0e", "store": "#9467bd",
           "coordinator": "#8c564b", "partition": "#7f7f7f"}  # fmt: skip


def write_report(
    directory: Path,
    history: Sequence[Op],
    faults: Sequence[Fault],
    results: dict[str, Result],
    settings: dict[str, Any],
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    doc = {
        "settings": settings,
        "valid": results["valid"].valid,
        "results": {name: _result_json(r) for name, r in results.items()},
        "faults": [f.__dict__ if hasattr(f, "__dict__") else _fault_json(f) for f in faults],
    }
    (directory / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    plots = [
        _throughput(directory / "throughput.png", history, faults),
        _nodes(directory / "nodes.png", history, faults),
        _tally(directory / "tally.png", results),
    ]
    page = directory / "report.html"
    page.write_text(_html(settings, results, faults, [p for p in plots if p is not None]))
    return page


def _fault_json(f: Fault) -> dict[str, Any]:
    return {"kind": f.kind, "target": f.target, "start": f.start, "end": f.end}


def _result_json(r: Result) -> dict[str, Any]:
    return {"valid": r.valid, "summary": r.summary, "details": r.details, "errors": r.errors}


def _shade(ax: Any, faults: Sequence[Fault]) -> None:
    seen = set()
    for f in faults:
        label = f.kind if f.kind not in seen else None
        seen.add(f.kind)
        ax.axvspan(f.start, f.end, color=_COLORS.get(f.kind, "#cccccc"), alpha=0.2, label=label)


def _throughput(path: Path, history: Sequence[Op], faults: Sequence[Fault]) -> Path | None:
    import matplotlib.pyplot as plt

    invoked: dict[int, float] = {}
    per_second: dict[int, int] = defaultdict(int)
    latencies: dict[int, list[float]] = defaultdict(list)
    for op in history:
        if op.f != "add":
            continue
        if op.type == "invoke":
            invoked[op.process] = op.time
        elif op.type == "ok":
            second = int(op.time)
            per_second[second] += 1
            if op.process in invoked:
                latencies[second].append(op.time - invoked[op.process])
    if not per_second:
        return None
    end = max(per_second) + 1
    xs = list(range(end))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    top.plot(xs, [per_second.get(x, 0) for x in xs], color="#1f77b4")
    top.set_ylabel("acknowledged / s")
    _shade(top, faults)
    top.legend(loc="upper right", fontsize=8)
    p50 = [_pct(latencies.get(x, []), 50) for x in xs]
    p99 = [_pct(latencies.get(x, []), 99) for x in xs]
    bottom.plot(xs, p50, label="p50", color="#2ca02c")
    bottom.plot(xs, p99, label="p99", color="#d62728")
    bottom.set_yscale("log")
    bottom.set_ylabel("latency (s)")
    bottom.set_xlabel("seconds into the run")
    _shade(bottom, faults)
    bottom.legend(loc="upper right", fontsize=8)
    top.set_title("throughput and latency; fault windows shaded")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _nodes(path: Path, history: Sequence[Op], faults: Sequence[Fault]) -> Path | None:
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
    for op in history:
        if op.f == "scrape" and op.type == "ok" and isinstance(op.value, dict):
            total = sum(op.value.get("values", {}).values())
            series[op.value["node"]].append((op.time, total, op.value.get("pid", 0)))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(11, 5))
    for node, points in sorted(series.items()):
        line = ax.plot([p[0] for p in points], [p[1] for p in points], label=node, linewidth=1.5)
        color = line[0].get_color()
        for before, after in itertools.pairwise(points):
            if after[2] != before[2]:  # a new incarnation answered
                ax.plot(after[0], after[1], marker="o", color=color, markersize=5)
    _shade(ax, faults)
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("the node's own total (its /metrics)")
    ax.set_title("each node's counter across its restarts (dots: a new incarnation)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _tally(path: Path, results: dict[str, Result]) -> Path | None:
    import matplotlib.pyplot as plt

    per_label = results.get("counter")
    table = per_label.details.get("label_sets", {}) if per_label else {}
    if not table:
        return None
    names = sorted(table)
    acked = [table[n].get("acknowledged", 0) for n in names]
    unknown = [table[n].get("unknown", 0) for n in names]
    final = [table[n].get("final") or 0 for n in names]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.bar([x - 0.2 for x in xs], acked, width=0.4, label="acknowledged", color="#2ca02c")
    ax.bar([x - 0.2 for x in xs], unknown, width=0.4, bottom=acked, label="+ unknown",
           color="#bcbd22")  # fmt: skip
    ax.bar([x + 0.2 for x in xs], final, width=0.4, label="stored (final read)", color="#1f77b4")
    ax.set_xticks(list(xs), [_short(n) for n in names], rotation=20, fontsize=8)
    ax.set_ylabel("increments")
    ax.set_title("acknowledged vs stored, per label set")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _short(label_key: str) -> str:
    try:
        return ",".join(f"{k}={v}" for k, v in json.loads(label_key).items())
    except ValueError:
        return label_key


def _verdict(valid: bool | None) -> str:
    return {True: "valid", False: "INVALID", None: "unknown"}[valid]


def _html(
    settings: dict[str, Any], results: dict[str, Result], faults: Sequence[Fault],
    plots: list[Path],
) -> str:  # fmt: skip
    e = html.escape
    overall = results["valid"].valid
    rows = "".join(
        f"<tr><td>{e(name)}</td><td class='{_verdict(r.valid)}'>{_verdict(r.valid)}</td>"
        f"<td>{e(r.summary)}</td><td>{'<br>'.join(e(x) for x in r.errors[:20])}</td></tr>"
        for name, r in results.items()
        if name != "valid"
    )
    fault_rows = "".join(
        f"<tr><td>{e(f.kind)}</td><td>{e(f.target)}</td><td>{f.start:.2f}</td>"
        f"<td>{f.end:.2f}</td><td>{f.end - f.start:.2f}</td></tr>"
        for f in faults
    )
    not_run = "".join(
        f"<li><b>{e(str(kind))}</b>: {e(str(why))}</li>"
        for kind, why in (settings.get("unavailable_faults") or {}).items()
    )
    not_run = f"<p>Asked for but not run here:</p><ul>{not_run}</ul>" if not_run else ""
    images = "".join(f"<p><img src='{e(p.name)}' alt='{e(p.stem)}'></p>" for p in plots)
    setting_rows = "".join(
        f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in settings.items()
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>keepcount verify: {_verdict(overall)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px }}
table {{ border-collapse: collapse; margin: 1em 0 }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; font-size: 14px }}
.valid {{ color: #2a7d2a; font-weight: bold }} .INVALID {{ color: #c00; font-weight: bold }}
.unknown {{ color: #a60; font-weight: bold }} img {{ max-width: 100% }}
</style></head><body>
<h1>keepcount verify: <span class="{_verdict(overall)}">{_verdict(overall)}</span></h1>
<p>{e(results["valid"].summary)}</p>
<h2>Checkers</h2>
<table><tr><th>checker</th><th>verdict</th><th>summary</th><th>errors (first 20)</th></tr>
{rows}</table>
<h2>Faults</h2>
<table><tr><th>kind</th><th>target</th><th>start (s)</th><th>end (s)</th><th>duration (s)</th></tr>
{fault_rows}</table>
{not_run}
<h2>Plots</h2>{images}
<h2>Settings</h2><table>{setting_rows}</table>
<p>The history is <a href="history.jsonl">history.jsonl</a> (one operation per line);
the results are in <a href="results.json">results.json</a>.</p>
</body></html>
"""
