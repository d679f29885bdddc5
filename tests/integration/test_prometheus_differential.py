"""Differential test: ``keepcount.prometheus`` against prometheus_client itself.

prometheus_client's behaviour is the specification of ``keepcount.prometheus``.
Hypothesis generates programs - metric declarations (good and bad), then
``labels()`` by position and by keyword, ``inc``/``dec``/``set``/``observe``
with awkward numbers, ``reset``, ``set_to_current_time``, ``time()``,
``count_exceptions()`` and ``track_inprogress()`` as context managers and
decorators, ``info``, ``state``, ``remove``, ``remove_by_labels``, ``clear``,
calls on child handles kept from earlier, bad calls of every kind, and
restarts - and runs each one side by side on

(a) prometheus_client with its own ``CollectorRegistry()``;
(b) ``keepcount.prometheus`` in memory (``CollectorRegistry()``, no store);
(c) ``keepcount.prometheus`` bound to a fresh SQLite file in a temp dir
    (``CollectorRegistry(store=..., node="t1", flush_interval=None)``: it
    writes when it is collected or committed, so a run does not depend on a
    background flush's timing).

What is compared, strictly:

- every call's outcome: the exception's type and message, or none;
- at random points and at the end, the text of both expositions - the
  Prometheus text format (``prometheus_client.generate_latest``) and
  OpenMetrics (``prometheus_client.openmetrics.exposition.generate_latest``)
  - byte for byte, or the exception rendering raised (type and first
  argument: prometheus_client appends the failing metric, created times and
  all, to the arguments).

What is normalised, and why (nothing else is):

- ``_created`` sample values are set to 0 before rendering, on every side:
  they are creation times, which differ between any two runs.
- ``set_to_current_time`` and the timers: ``time.time`` as prometheus_client's
  metrics module sees it (``Gauge.set_to_current_time`` is prometheus_client's
  code in both libraries) and ``default_timer`` of
  ``prometheus_client.context_managers`` (the ``Timer`` both libraries use)
  are replaced by fake clocks, so the values set and observed are the same
  numbers on every side.
- For (c), the documented differences of a store-bound registry are applied
  to (a)'s metrics to make the expectation: gauges of ``multiprocess_mode``
  ``all`` (the default) or ``liveall`` carry the label ``pid="t1"`` (the slot
  id); and series come in the order the collecting process made their label
  sets, then the others sorted by their stored key - which only differs from
  prometheus_client's order after a restart.

The op ``Restart`` applies to (c) only: its registry is closed and a new one
opened on the same store and node, the same metrics declared again in the same
order, as a restarted process does at import; the new metric objects replace
the old ones, and child handles kept from before are dropped on every side.
(a) and (b) did not restart; what a restart documentedly loses is taken away
from them too: a gauge of a ``live*`` mode starts again (a labelled one loses
every series: ``.clear()``; a label-less one is 0: ``.set(0)``).  Everything
else must survive exactly.  A registry never used before its restart (no
value changed, no commit, no collect) is committed first: documented, it
opens nothing, so label sets it only made would not be written.

Histogram bounds are finite, then +Inf or not: keepcount refuses NaN, -Inf
and a repeated +Inf, which prometheus_client takes (documented; a test
below).

Exemplars are not kept in a store (documented) and are not used here.

Beside the property: fixed cases it may rarely hit (a restart with the default
flush interval, a list of bad calls, a prometheus_client registry registering
a keepcount one), the differences it found, shrunk (``FOUND``, fixed and kept
as regressions), and proof that the check fails on a mutant.

``KEEPCOUNT_DIFF_EXAMPLES`` sets the number of programs: 300 by default (a few
seconds when they pass), e.g. ``KEEPCOUNT_DIFF_EXAMPLES=20000`` for a soak.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import prometheus_client
import prometheus_client.context_managers
import prometheus_client.metrics
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest

import keepcount.prometheus as kp
from keepcount.metrics import label_key
from keepcount.prometheus.series import CounterSeries

NODE = "t1"
PID = "pid"
MAX_EXAMPLES = int(os.environ.get("KEEPCOUNT_DIFF_EXAMPLES", "300"))
NOW = 1_700_000_000.25
"""What ``time.time()`` says to prometheus_client's metric code (``set_to_current_time``)."""

KIND_OF_TYPE = {
    "counter": "Counter",
    "gauge": "Gauge",
    "summary": "Summary",
    "histogram": "Histogram",
    "info": "Info",
    "stateset": "Enum",
}
KINDS = tuple(KIND_OF_TYPE.values())
GAUGE_MODES = tuple(sorted(prometheus_client.Gauge._MULTIPROC_MODES))
CREATED_TYPES = frozenset(("counter", "summary", "histogram"))


class Boom(Exception):
    """Raised inside a timed, tracked or counted block."""


EXCEPTIONS: dict[str, Any] = {
    "Exception": Exception,
    "ValueError": ValueError,
    "Boom": Boom,
    "KeyError|Boom": (KeyError, Boom),
}


# -- programs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Declare:
    """Declare a metric (``kind`` is the class name), on every side."""

    kind: str
    name: str
    labelnames: tuple[str, ...] = ()
    doc: str = "help"
    namespace: str = ""
    subsystem: str = ""
    unit: str = ""
    mode: str | None = None
    """Gauge's ``multiprocess_mode`` (None: not passed, the default)."""
    buckets: tuple[Any, ...] | None = None
    """Histogram's buckets (None: not passed, the default)."""
    states: tuple[str, ...] | None = None
    """Enum's states."""

    def make(self, lib: Any, registry: Any) -> Any:
        kwargs: dict[str, Any] = {"registry": registry}
        for option in ("namespace", "subsystem", "unit"):
            if getattr(self, option):
                kwargs[option] = getattr(self, option)
        if self.mode is not None:
            kwargs["multiprocess_mode"] = self.mode
        if self.buckets is not None:
            kwargs["buckets"] = self.buckets
        if self.kind == "Enum":
            kwargs["states"] = self.states
        return getattr(lib, self.kind)(self.name, self.doc, self.labelnames, **kwargs)

    def text(self) -> str:
        options = {
            "namespace": self.namespace,
            "subsystem": self.subsystem,
            "unit": self.unit,
            "multiprocess_mode": self.mode,
            "buckets": self.buckets,
            "states": self.states if self.kind == "Enum" else None,
        }
        given = {k: v for k, v in options.items() if v}
        if self.kind == "Enum" and self.states is not None and not self.states:
            given["states"] = self.states
        args = (self.name, self.doc, list(self.labelnames))
        return f"{self.kind}({_call_text(args, given)}, registry=reg)"


@dataclass(frozen=True)
class Labels:
    """A ``labels()`` call shaped at run time for the metric it is made on.

    ``style``: ``args``/``kwargs`` - the right call (by position / keyword;
    none at all on a label-less metric); ``none`` - no ``labels()`` (the
    parent itself: a bad call on a labelled metric); ``plain`` - ``labels()``
    with as many values as label names, even none; ``short``/``long`` - one
    value too few / too many; ``wrong_name`` - a keyword that is no label
    name; ``both`` - positional and keyword values."""

    values: tuple[Any, ...]
    style: str = "args"


@dataclass(frozen=True)
class On:
    """The metric ``metric`` (modulo the number declared), through ``labels``."""

    metric: int
    labels: Labels


@dataclass(frozen=True)
class OnHandle:
    """A child kept from an earlier ``Child`` op (modulo the number kept)."""

    handle: int


@dataclass(frozen=True)
class Child:
    """``labels()``, keeping the child as a handle for later ops."""

    target: On


@dataclass(frozen=True)
class Act:
    """One call on a metric or child.  ``action`` indexes the actions of the
    metric's type (``ACTIONS``); with ``wild``, every action of any type (a
    method the type may not have)."""

    target: On | OnHandle
    action: int
    wild: bool = False
    amount: Any = 1.0
    duration: float = 0.25
    raises: str | None = None
    catch: str = "Exception"
    info: tuple[tuple[str, Any], ...] = ()
    state: str = "running"


@dataclass(frozen=True)
class Remove:
    metric: int
    labels: Labels


@dataclass(frozen=True)
class RemoveByLabels:
    """``remove_by_labels``: keys are label names by index (modulo the
    metric's), or a raw name; ``not_a_dict`` passes a list instead."""

    metric: int
    pairs: tuple[tuple[int | str, Any], ...]
    not_a_dict: bool = False


@dataclass(frozen=True)
class Clear:
    metric: int


@dataclass(frozen=True)
class Check:
    """Compare the expositions now."""


@dataclass(frozen=True)
class Restart:
    """Restart (c); take from (a) and (b) what a restart documentedly loses."""

    bind: bool = True
    """Bind the new registry at once (a commit), before the ops that follow.
    Without it they run before the slot's stored values are read, and are
    added to them when they are: documented, float rounding may then differ
    from adding in order (stored 0.1, then 0.2 and 0.3 counted: 0.1 + (0.2 +
    0.3) is not (0.1 + 0.2) + 0.3), so the property binds at once and the
    cases of ``FOUND`` that need the window do not."""


Op = Child | Act | Remove | RemoveByLabels | Clear | Declare | Check | Restart


@dataclass(frozen=True)
class Program:
    declarations: tuple[Declare, ...]
    ops: tuple[Op, ...]


ACTIONS: dict[str, tuple[str, ...]] = {
    "counter": ("inc", "inc()", "reset", "count_exceptions:with", "count_exceptions:@"),
    "gauge": (
        "inc",
        "dec",
        "set",
        "inc()",
        "dec()",
        "set_to_current_time",
        "time:with",
        "time:@",
        "track_inprogress:with",
        "track_inprogress:@",
    ),
    "summary": ("observe", "time:with", "time:@"),
    "histogram": ("observe", "time:with", "time:@"),
    "info": ("info",),
    "stateset": ("state",),
}
ALL_ACTIONS = tuple(sorted({a for actions in ACTIONS.values() for a in actions}))


# -- strategies -----------------------------------------------------------------------

INF = math.inf
AMOUNTS = st.one_of(
    st.sampled_from([0, 0.0, -0.0, 1, 1.0, 2.5, -1, -0.5, 1e308, -1e308, 5e-324, 2**53 + 1]),
    st.sampled_from([INF, -INF, math.nan, 10**30]),
    st.floats(),
    st.integers(-3, 10),
    st.sampled_from(["1", "x", None, 10**400, True]),  # not numbers, or too large for a float
)
LABEL_VALUES = st.one_of(
    st.sampled_from(["a", "b"]),
    st.sampled_from(["a", "b", "c"]),
    st.sampled_from(["", 'q"uote', "back\\slash", "new\nline", "ü", "a b", 7, 2.5, None, True]),
)
LABEL_NAMES = st.one_of(
    st.lists(st.sampled_from(["l", "m", "route"]), max_size=2, unique=True),
    st.lists(st.sampled_from(["l", "m", "route"]), max_size=2, unique=True),
    st.lists(st.sampled_from(["l", "le", "quantile", "__r", "a-b", "ü"]), max_size=2),
)
DOCS = st.sampled_from(["help", "", 'with \\ backslash,\nnewline and "quotes"', "ü"])
NAME_FORMS = st.sampled_from(["m{}", "m{}_total", "m{}_seconds", "m{}_created", "mé{}", "m{}-x"])
BUCKET_VALUES = st.one_of(
    st.sampled_from([-1.0, -0.0, 0.0, 0.001, 0.5, 1, 2.5, 10, 1e300]),
    st.floats(allow_nan=False, allow_infinity=False),
)
# Finite bounds, then +Inf or not: keepcount refuses the others prometheus_client
# takes (documented; test_bucket_bounds_no_store_can_hold_are_refused).
_BOUNDS = st.tuples(st.lists(BUCKET_VALUES, max_size=4), st.booleans()).map(
    lambda b: (*sorted(b[0]), *([INF] if b[1] else []))
)
BUCKETS = st.one_of(
    st.none(),
    _BOUNDS,
    _BOUNDS.map(lambda b: tuple(str(x) for x in b)),
    st.just((2.0, 1.0)),  # not sorted: a bad declaration
)
STATES = st.one_of(
    st.lists(
        st.sampled_from(["starting", "running", "stopped", "a b", "ü", ""]),
        min_size=1,
        max_size=3,
        unique=True,
    ).map(tuple),
    st.sampled_from([None, ()]),  # no states: a bad declaration
)
INFO = st.lists(
    st.tuples(
        st.sampled_from(["version", "build", "l", "m", "a b"]),
        st.one_of(st.sampled_from(["1.0", "", "x y", 'q"', "ü"]), st.sampled_from([None, 3])),
    ),
    max_size=3,
).map(lambda pairs: tuple(dict(pairs).items()))
BAD_DECLARATIONS = st.sampled_from(
    [
        Declare("Counter", ""),  # empty name
        Declare("Gauge", "g", mode="bogus"),
        Declare("Histogram", "h", ("le",)),
        Declare("Summary", "s", ("quantile",)),
        Declare("Counter", "c", ("__reserved",)),
        Declare("Histogram", "h", buckets=(3.0, 1.0)),
        Declare("Histogram", "h", buckets=()),
        Declare("Enum", "e", ("e",), states=("a",)),
        Declare("Enum", "e", states=()),
        Declare("Info", "i", unit="seconds"),
        Declare("Enum", "e", unit="bytes", states=("a",)),
    ]
)


@st.composite
def declarations(draw: st.DrawFn, own_name: bool = False) -> Declare:
    """A declaration of a name that may clash with one declared already; with
    ``own_name``, its name has a ``{}`` for its index (``programs``)."""
    kind = draw(st.sampled_from(KINDS))
    name = draw(NAME_FORMS)
    if not own_name:
        name = name.format(draw(st.integers(0, 3)))
    return Declare(
        kind=kind,
        name=name,
        labelnames=tuple(draw(LABEL_NAMES)),
        doc=draw(DOCS),
        namespace=draw(st.sampled_from(["", "", "ns"])),
        subsystem=draw(st.sampled_from(["", "", "", "sub"])),
        unit=draw(st.sampled_from(["", "", "", "seconds"])) if kind not in ("Info", "Enum") else "",
        mode=draw(st.sampled_from([None, *GAUGE_MODES])) if kind == "Gauge" else None,
        buckets=draw(BUCKETS) if kind == "Histogram" else None,
        states=draw(STATES) if kind == "Enum" else None,
    )


LABEL_STYLES = st.sampled_from(
    ["args"] * 5 + ["kwargs"] * 4 + ["none", "plain", "short", "long", "wrong_name", "both"]
)
LABEL_CALLS = st.builds(Labels, st.tuples(LABEL_VALUES, LABEL_VALUES, LABEL_VALUES), LABEL_STYLES)
METRIC_INDEX = st.integers(0, 5)
ON = st.builds(On, METRIC_INDEX, LABEL_CALLS)
TARGETS = st.one_of(ON, ON, st.builds(OnHandle, st.integers(0, 5)))
ACTS = st.builds(
    Act,
    target=TARGETS,
    action=st.integers(0, 9),
    wild=st.sampled_from([False] * 12 + [True]),
    amount=AMOUNTS,
    duration=st.sampled_from([0.25, 0.0, 1.5, 1e-9, 3600.0, -1.0]),
    raises=st.sampled_from([None, None, "ValueError", "Boom"]),
    catch=st.sampled_from(sorted(EXCEPTIONS)),
    info=INFO,
    state=st.sampled_from(["starting", "running", "stopped", "a b", "ü", "", "unknown"]),
)
REMOVE_BY_LABELS = st.builds(
    RemoveByLabels,
    METRIC_INDEX,
    st.lists(
        st.tuples(st.one_of(st.integers(0, 1), st.just("nope")), LABEL_VALUES), max_size=2
    ).map(tuple),
    st.sampled_from([False] * 9 + [True]),
)
OPS = st.sampled_from(
    [
        *[ACTS] * 12,
        *[st.builds(Child, ON)] * 3,
        st.builds(Remove, METRIC_INDEX, LABEL_CALLS),
        st.builds(Remove, METRIC_INDEX, LABEL_CALLS),
        REMOVE_BY_LABELS,
        st.builds(Clear, METRIC_INDEX),
        st.one_of(declarations(), BAD_DECLARATIONS),
        st.just(Check()),
        st.just(Restart()),
    ]
).flatmap(lambda strategy: strategy)
"""One op; the list's repetitions weight the choice."""


@st.composite
def programs(draw: st.DrawFn) -> Program:
    drawn = draw(st.lists(declarations(own_name=True), min_size=1, max_size=4))
    decls = tuple(replace(d, name=d.name.format(i)) for i, d in enumerate(drawn))
    # Batches of 1-4 ops: about 17 ops on average, yet a failure shrinks to the ops it needs.
    batches = draw(st.lists(st.lists(OPS, min_size=1, max_size=4), min_size=2, max_size=20))
    return Program(decls, tuple(op for batch in batches for op in batch))


# -- running a program on the three sides ----------------------------------------------


class FakeClock:
    """``default_timer`` of prometheus_client's ``Timer``: the next timer
    measures ``duration`` (a negative one: time going backwards)."""

    def __init__(self) -> None:
        self.readings = [100.0]

    def will_measure(self, duration: float) -> None:
        self.readings = [100.0, 100.0 + duration]

    def __call__(self) -> float:
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


class Side:
    def __init__(self, name: str, lib: Any, registry: Any) -> None:
        self.name = name
        self.lib = lib
        self.registry = registry
        self.metrics: list[Any] = []
        self.handles: list[Any] = []


Outcome = tuple[str, str] | None
"""An exception's type name and message, or None."""


def _outcome(call: Callable[[], Any]) -> tuple[Outcome, Any]:
    try:
        return None, call()
    except Exception as exc:
        return (type(exc).__name__, str(exc)), None


def _label_args(
    names: tuple[str, ...], spec: Labels
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The arguments of the ``labels()`` call ``spec`` asks for; None for no call."""
    n = len(names)
    values, style = spec.values, spec.style
    if style == "none" or (style in ("args", "kwargs") and not n):
        return None
    if style in ("args", "plain"):
        return values[:n], {}
    if style == "kwargs":
        return (), dict(zip(names, values, strict=False))
    if style == "short":
        return values[: max(n - 1, 0)], {}
    if style == "long":
        return values[: n + 1], {}
    if style == "wrong_name":
        return (), {**dict(zip(names[:-1], values, strict=False)), "nope": values[-1]}
    assert style == "both"
    return (values[0],), {names[-1] if n else "l": values[1]}


def _label_call(metric: Any, spec: Labels) -> Any:
    """The child ``spec`` asks for (or the metric itself)."""
    arguments = _label_args(tuple(metric._labelnames), spec)
    if arguments is None:
        return metric
    args, kwargs = arguments
    return metric.labels(*args, **kwargs)


def _call_text(args: Iterable[Any], kwargs: dict[str, Any] | None = None) -> str:
    return ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in (kwargs or {}).items())])


def _action_text(action: str, act: Act, target: str) -> str:
    """``action`` on ``target`` as Python (for the story of a failing run)."""
    if action in ("inc", "dec", "set", "observe"):
        return f"{target}.{action}({act.amount!r})"
    if action == "info":
        return f"{target}.info({dict(act.info)!r})"
    if action == "state":
        return f"{target}.state({act.state!r})"
    if ":" not in action:
        return f"{target}.{action.removesuffix('()')}()"
    method, form = action.split(":")
    catch = "(KeyError, Boom)" if act.catch == "KeyError|Boom" else act.catch
    manager = f"{target}.{method}({catch if method == 'count_exceptions' else ''})"
    body = f"raise {act.raises}(...)" if act.raises else "pass"
    clock = f"  # measuring {act.duration}" if method == "time" else ""
    if form == "with":
        return f"with {manager}: {body}{clock}"
    return f"{manager}(lambda: {body})(){clock}"


def _blocked(act: Act) -> None:
    if act.raises == "ValueError":
        raise ValueError("raised in the block")
    if act.raises == "Boom":
        raise Boom("boom in the block")


def _perform(action: str, obj: Any, act: Act, clock: FakeClock) -> None:
    if action == "inc":
        obj.inc(act.amount)
    elif action == "inc()":
        obj.inc()
    elif action == "dec":
        obj.dec(act.amount)
    elif action == "dec()":
        obj.dec()
    elif action == "set":
        obj.set(act.amount)
    elif action == "observe":
        obj.observe(act.amount)
    elif action == "reset":
        obj.reset()
    elif action == "set_to_current_time":
        obj.set_to_current_time()
    elif action == "info":
        obj.info(dict(act.info))
    elif action == "state":
        obj.state(act.state)
    else:
        method, form = action.split(":")
        clock.will_measure(act.duration)
        if method == "time":
            manager = obj.time()
        elif method == "count_exceptions":
            manager = obj.count_exceptions(EXCEPTIONS[act.catch])
        else:
            manager = obj.track_inprogress()
        if form == "with":
            with manager:
                _blocked(act)
        else:

            def block() -> None:
                _blocked(act)

            manager(block)()


def _is_live(metric: Any) -> bool:
    return str(getattr(metric, "_multiprocess_mode", "")).startswith("live")


class _Rendered:
    """A registry's metrics as collected, ``_created`` values set to 0; for
    the expectation of (c), (a)'s metrics as a store-bound registry shows them
    (``host``: the differential run whose model says how)."""

    def __init__(self, registry: Any, host: Differential | None = None) -> None:
        self.registry = registry
        self.host = host

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            samples = [
                s._replace(value=0.0)
                if metric.type in CREATED_TYPES and s.name == metric.name + "_created"
                else s
                for s in metric.samples
            ]
            if self.host is not None:
                samples = self.host.as_kept(metric, samples)
            out = copy.copy(metric)
            out.samples = samples
            yield out


def _render(registry: Any) -> list[tuple[str, Any]]:
    """Both expositions of a (wrapped) registry, or the exception each raised."""
    out: list[tuple[str, Any]] = []
    for fmt, generate in (
        ("text", prometheus_client.generate_latest),
        ("openmetrics", om_generate_latest),
    ):
        try:
            out.append((fmt, generate(registry).decode()))
        except Exception as exc:
            out.append((fmt, (type(exc).__name__, str(exc.args[0]) if exc.args else "")))
    return out


class Differential:
    """One program's run on (a), (b) and (c), and its model of (c)'s order."""

    def __init__(self, store_url: str) -> None:
        self.store_url = store_url
        self.sides = [
            Side("prometheus_client", prometheus_client, prometheus_client.CollectorRegistry()),
            Side("keepcount in memory", kp, kp.CollectorRegistry()),
            Side("keepcount on SQLite", kp, self._store_registry()),
        ]
        self.decls: list[Declare] = []
        self.made: list[dict[tuple[str, ...], None]] = []
        """Per metric, the label sets (c)'s current process made, in order
        (prometheus_client's ``_metrics`` semantics, replayed from (a))."""
        self.trace: list[str] = []
        self.clock = FakeClock()

    def _store_registry(self) -> kp.CollectorRegistry:
        return kp.CollectorRegistry(store=self.store_url, node=NODE, flush_interval=None)

    def close(self) -> None:
        self.sides[2].registry.close()

    # -- ops ---------------------------------------------------------------------------

    def run(self, program: Program) -> None:
        for decl in program.declarations:
            self.apply(decl)
        for op in program.ops:
            self.apply(op)
        self.apply(Check())

    def apply(self, op: Op) -> None:
        if isinstance(op, Check):
            self.trace.append("# compare the expositions")
            self.check()
        elif isinstance(op, Restart):
            self.restart(op.bind)
        elif isinstance(op, Declare):
            self.declare(op)
        elif not self.decls or (isinstance(op, Act | Child) and self._handle_missing(op)):
            return  # nothing to call it on
        else:
            self.call(op)

    def _handle_missing(self, op: Act | Child) -> bool:
        return isinstance(op.target, OnHandle) and not self.sides[0].handles

    def _compare(self, what: str, outcomes: list[Outcome]) -> None:
        self.trace.append(what if outcomes[0] is None else f"{what}  # raises {outcomes[0]}")
        for side, outcome in zip(self.sides[1:], outcomes[1:], strict=True):
            if outcome != outcomes[0]:
                raise AssertionError(
                    f"outcomes differ: {side.name} {outcome!r}, prometheus_client "
                    f"{outcomes[0]!r}\n{self.story()}"
                )

    def story(self) -> str:
        return "the program as run on (a) (m: metrics, h: children kept):\n  " + "\n  ".join(
            self.trace
        )

    def declare(self, decl: Declare) -> None:
        results = [_outcome(lambda s=side: decl.make(s.lib, s.registry)) for side in self.sides]
        self._compare(f"m[{len(self.decls)}] = {decl.text()}", [o for o, _ in results])
        if results[0][0] is None:
            for side, (_, metric) in zip(self.sides, results, strict=True):
                side.metrics.append(metric)
            self.decls.append(decl)
            self.made.append({})

    def _target(self, side: Side, target: On | OnHandle, index: int) -> Any:
        if isinstance(target, OnHandle):
            return side.handles[target.handle % len(side.handles)]
        obj = _label_call(side.metrics[target.metric % len(side.metrics)], target.labels)
        if index == 0 and obj._labelvalues:  # (a) made (or got) a child
            self.made[target.metric % len(self.decls)].setdefault(tuple(obj._labelvalues))
        return obj

    def _describe(self, op: Op) -> str:
        """``op`` as Python, as (a) runs it."""
        a = self.sides[0]
        if isinstance(op, Child | Act):
            target = op.target
            if isinstance(target, OnHandle):
                where = f"h[{target.handle % len(a.handles)}]"
            else:
                m = target.metric % len(self.decls)
                arguments = _label_args(tuple(a.metrics[m]._labelnames), target.labels)
                where = f"m[{m}]" + (
                    "" if arguments is None else f".labels({_call_text(*arguments)})"
                )
            if isinstance(op, Child):
                return f"h[{len(a.handles)}] = {where}"
            return _action_text(self._action(op), op, where)
        assert isinstance(op, Remove | RemoveByLabels | Clear)
        m = op.metric % len(self.decls)
        if isinstance(op, Remove):
            return f"m[{m}].remove({_call_text(self._remove_values(op))})"
        if isinstance(op, RemoveByLabels):
            return f"m[{m}].remove_by_labels({self._remove_labels(op)!r})"
        return f"m[{m}].clear()"

    def _action(self, act: Act) -> str:
        if isinstance(act.target, OnHandle):
            obj = self.sides[0].handles[act.target.handle % len(self.sides[0].handles)]
        else:
            obj = self.sides[0].metrics[act.target.metric % len(self.decls)]
        actions = ALL_ACTIONS if act.wild else ACTIONS[obj._type]
        return actions[act.action % len(actions)]

    def _remove_values(self, op: Remove) -> tuple[Any, ...]:
        n = len(self.decls[op.metric % len(self.decls)].labelnames)
        count = {"short": n - 1, "long": n + 1}.get(op.labels.style, n)
        return op.labels.values[: max(count, 0)]

    def _remove_labels(self, op: RemoveByLabels) -> Any:
        names = self.decls[op.metric % len(self.decls)].labelnames
        labels = {
            (names[k % len(names)] if names else "l") if isinstance(k, int) else k: v
            for k, v in op.pairs
        }
        return list(labels.items()) if op.not_a_dict else labels

    def call(self, op: Child | Act | Remove | RemoveByLabels | Clear) -> None:
        what = self._describe(op)
        outcomes = []
        for index, side in enumerate(self.sides):
            outcome, _ = _outcome(lambda s=side, i=index: self._call(op, s, i))
            outcomes.append(outcome)
        self._compare(what, outcomes)

    def _call(self, op: Op, side: Side, index: int) -> None:
        if isinstance(op, Child):
            side.handles.append(self._target(side, op.target, index))
        elif isinstance(op, Act):
            _perform(self._action(op), self._target(side, op.target, index), op, self.clock)
        elif isinstance(op, Remove):
            m = op.metric % len(self.decls)
            values = self._remove_values(op)
            side.metrics[m].remove(*values)
            if index == 0:
                self.made[m].pop(tuple(str(v) for v in values), None)
        elif isinstance(op, RemoveByLabels):
            m = op.metric % len(self.decls)
            labels = self._remove_labels(op)
            side.metrics[m].remove_by_labels(labels)
            if index == 0 and labels:
                names = self.decls[m].labelnames
                want = {names.index(k): str(v) for k, v in labels.items()}
                for key in list(self.made[m]):
                    if all(key[i] == v for i, v in want.items()):
                        del self.made[m][key]
        elif isinstance(op, Clear):
            m = op.metric % len(self.decls)
            side.metrics[m].clear()
            if index == 0:
                self.made[m].clear()

    def restart(self, bind: bool = True) -> None:
        self.trace.append("# restart (c)")
        store = self.sides[2]
        keepcount = store.registry.keepcount
        if keepcount is not None and not keepcount._started:
            # Documented: a registry never used (no value changed, no commit, no
            # collect) opens nothing, so label sets it only made are not written.
            store.registry.commit_sync()
        store.registry.close()
        store.registry = self._store_registry()
        outcome, metrics = _outcome(lambda: [decl.make(kp, store.registry) for decl in self.decls])
        if outcome is not None:
            raise AssertionError(f"declaring again after a restart: {outcome}\n{self.story()}")
        store.metrics = metrics
        if bind:
            store.registry.commit_sync()
        for side in self.sides[:2]:  # what a restart documentedly loses
            for metric in side.metrics:
                if _is_live(metric):
                    if metric._labelnames:
                        metric.clear()
                    else:
                        metric.set(0)
        for side in self.sides:
            side.handles = []
        self.made = [{} for _ in self.decls]

    # -- expositions -------------------------------------------------------------------

    def check(self) -> None:
        a, b, c = (side.registry for side in self.sides)
        expected = _render(_Rendered(a))
        for side, got in (
            (self.sides[1], _render(_Rendered(b))),
            (self.sides[2], _render(_Rendered(c))),
        ):
            want = _render(_Rendered(a, self)) if side is self.sides[2] else expected
            for (fmt, w), (_, g) in zip(want, got, strict=True):
                if w != g:
                    raise AssertionError(
                        f"{fmt} expositions differ: {side.name} vs prometheus_client\n"
                        f"--- expected\n{_show(w)}\n--- got\n{_show(g)}\n{self.story()}"
                    )

    def as_kept(self, metric: Metric, samples: list[Any]) -> list[Any]:
        """(a)'s samples of ``metric`` as the store-bound (c) must show them."""
        a = self.sides[0]
        index = next((i for i, m in enumerate(a.metrics) if m._name == metric.name), None)
        if index is None:
            return samples
        pc_metric = a.metrics[index]
        names = tuple(pc_metric._labelnames)
        if names and samples:  # the label sets this process made, in order; then the others, sorted
            # Each child gives as many samples, in the order of (a)'s children (not
            # read back from the samples' labels: label names may repeat).
            keys = list(pc_metric._metrics)
            per_child, left = divmod(len(samples), len(keys))
            assert not left, (keys, samples)
            groups = {k: samples[i * per_child : (i + 1) * per_child] for i, k in enumerate(keys)}
            made = [k for k in self.made[index] if k in groups]
            rest = sorted(groups.keys() - set(made), key=label_key)
            samples = [s for k in made + rest for s in groups[k]]
        if metric.type == "gauge" and pc_metric._multiprocess_mode in ("all", "liveall"):
            samples = [s._replace(labels={**s.labels, PID: NODE}) for s in samples]
        return samples


def _show(rendered: Any) -> str:
    return rendered if isinstance(rendered, str) else f"raised {rendered!r}"


def run_program(program: Program, directory: Path | str) -> None:
    """Run ``program`` on the three sides; AssertionError at the first difference."""
    clock = FakeClock()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prometheus_client.context_managers, "default_timer", clock)
        mp.setattr(prometheus_client.metrics, "time", types.SimpleNamespace(time=lambda: NOW))
        run = Differential(f"sqlite:///{directory}/c.db")
        run.clock = clock
        try:
            run.run(program)
        finally:
            run.close()


# -- the property ------------------------------------------------------------------------


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    report_multiple_bugs=False,
)
@given(program=programs())
def test_keepcount_prometheus_behaves_as_prometheus_client(
    program: Program, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as directory:
        run_program(program, directory)


# -- fixed cases hypothesis may rarely hit ------------------------------------------------


def _normalised_text(registry: Any) -> str:
    return prometheus_client.generate_latest(_Rendered(registry)).decode()


@pytest.mark.g3
def test_sqlite_counter_with_labels_survives_a_restart(tmp_path: Path) -> None:
    """The default flush interval this time: a restarted process's registry
    shows the same exposition as prometheus_client's that never restarted."""
    url = f"sqlite:///{tmp_path}/c.db"

    def declare(lib: Any, registry: Any) -> Any:
        return lib.Counter("requests", "Requests.", ["route", "code"], registry=registry)

    pc_reg = prometheus_client.CollectorRegistry()
    pc_counter = declare(prometheus_client, pc_reg)
    kp_reg = kp.CollectorRegistry(store=url, node=NODE)
    kp_counter = declare(kp, kp_reg)
    for counter in (pc_counter, kp_counter):
        counter.labels("/", "200").inc()
        counter.labels(route="/a", code="500").inc(2.5)
        counter.labels("/", "200").inc(3)
        counter.labels("/never", "204")
    kp_reg.commit_sync()
    before = _normalised_text(kp_reg)
    assert before == _normalised_text(pc_reg)
    kp_reg.close()

    kp_reg = kp.CollectorRegistry(store=url, node=NODE)
    kp_counter = declare(kp, kp_reg)
    try:
        assert _normalised_text(kp_reg) == before  # made in that order, sorted here too
        for counter in (pc_counter, kp_counter):
            counter.labels(route="/a", code="500").inc()
        text = _normalised_text(kp_reg)
        assert 'requests_total{code="500",route="/a"} 3.5' in text
        assert kp.generate_latest(kp_reg) == prometheus_client.generate_latest(kp_reg)
        assert text == _normalised_text(pc_reg).replace(
            # made by this process first now, then the others sorted by key
            'requests_total{code="200",route="/"} 4.0\nrequests_total{code="500",route="/a"} 3.5\n',
            'requests_total{code="500",route="/a"} 3.5\nrequests_total{code="200",route="/"} 4.0\n',
        ).replace(
            'requests_created{code="200",route="/"} 0.0\nrequests_created{code="500",route="/a"} 0.0\n',
            'requests_created{code="500",route="/a"} 0.0\nrequests_created{code="200",route="/"} 0.0\n',
        )
    finally:
        kp_reg.close()


def _bad_calls() -> list[tuple[str, Callable[[Any, Any], Any]]]:
    def counter(lib: Any, reg: Any, labels: Iterable[str] = ("l",)) -> Any:
        return lib.Counter("c", "C.", list(labels), registry=reg)

    def gauge(lib: Any, reg: Any, mode: str = "all", labels: Iterable[str] = ()) -> Any:
        return lib.Gauge("g", "G.", list(labels), registry=reg, multiprocess_mode=mode)

    def twice(lib: Any, reg: Any) -> Any:
        counter(lib, reg)
        return counter(lib, reg)

    def info(lib: Any, reg: Any, labels: Iterable[str] = ()) -> Any:
        return lib.Info("i", "I.", list(labels), registry=reg)

    def enum(lib: Any, reg: Any, labels: Iterable[str] = ()) -> Any:
        return lib.Enum("e", "E.", list(labels), registry=reg, states=["a", "b"])

    def hist(lib: Any, reg: Any, labels: Iterable[str] = ("l",)) -> Any:
        return lib.Histogram("h", "H.", list(labels), registry=reg)

    return [
        ("wrong label count", lambda lib, reg: counter(lib, reg).labels("a", "b")),
        ("no label values", lambda lib, reg: counter(lib, reg).labels()),
        ("args and kwargs", lambda lib, reg: counter(lib, reg).labels("a", l="b")),
        ("wrong label name", lambda lib, reg: counter(lib, reg).labels(x="a")),
        ("labels on a label-less metric", lambda lib, reg: counter(lib, reg, ()).labels("a")),
        ("labels chained", lambda lib, reg: counter(lib, reg).labels("a").labels("b")),
        ("inc without labels", lambda lib, reg: counter(lib, reg).inc()),
        ("negative inc", lambda lib, reg: counter(lib, reg).labels("a").inc(-1)),
        ("inc of a string", lambda lib, reg: counter(lib, reg, ()).inc("1")),
        ("inc too large", lambda lib, reg: counter(lib, reg, ()).inc(10**400)),
        ("reset without labels", lambda lib, reg: counter(lib, reg).reset()),
        ("count_exceptions without labels", lambda lib, reg: counter(lib, reg).count_exceptions()),
        ("set without labels", lambda lib, reg: gauge(lib, reg, labels=("l",)).set(1)),
        ("set of a string", lambda lib, reg: gauge(lib, reg).set("x")),
        ("dec of None", lambda lib, reg: gauge(lib, reg).dec(None)),
        ("inc in mostrecent", lambda lib, reg: gauge(lib, reg, "mostrecent").inc()),
        ("dec in livemostrecent", lambda lib, reg: gauge(lib, reg, "livemostrecent").dec()),
        ("bad mode", lambda lib, reg: gauge(lib, reg, "bogus")),
        (
            "track_inprogress without labels",
            lambda lib, reg: gauge(lib, reg, labels=("l",)).track_inprogress(),
        ),
        ("observe without labels", lambda lib, reg: hist(lib, reg).observe(1)),
        ("observe a string", lambda lib, reg: hist(lib, reg, ()).observe("x")),
        ("unknown enum state", lambda lib, reg: enum(lib, reg).state("c")),
        ("enum state without labels", lambda lib, reg: enum(lib, reg, ("l",)).state("a")),
        ("enum without states", lambda lib, reg: lib.Enum("e", "E.", registry=reg)),
        (
            "enum name in its labels",
            lambda lib, reg: lib.Enum("e", "E.", ["e"], registry=reg, states=["a"]),
        ),
        (
            "info overlapping its label",
            lambda lib, reg: info(lib, reg, ("l",)).labels("a").info({"l": "x"}),
        ),
        ("info with None", lambda lib, reg: info(lib, reg).info({"v": None})),
        ("info without labels", lambda lib, reg: info(lib, reg, ("l",)).info({"v": "1"})),
        ("info with a unit", lambda lib, reg: lib.Info("i", "I.", registry=reg, unit="s")),
        ("empty name", lambda lib, reg: lib.Counter("", "C.", registry=reg)),
        ("reserved label le", lambda lib, reg: hist(lib, reg, ("le",))),
        (
            "reserved label quantile",
            lambda lib, reg: lib.Summary("s", "S.", ["quantile"], registry=reg),
        ),
        ("reserved label __x", lambda lib, reg: counter(lib, reg, ("__x",))),
        (
            "buckets not sorted",
            lambda lib, reg: lib.Histogram("h", "H.", registry=reg, buckets=[2, 1]),
        ),
        ("one bucket", lambda lib, reg: lib.Histogram("h", "H.", registry=reg, buckets=[INF])),
        ("duplicate registration", twice),
        (
            "duplicate via _total",
            lambda lib, reg: (counter(lib, reg), lib.Gauge("c_total", "G.", registry=reg)),
        ),
        ("remove without label names", lambda lib, reg: counter(lib, reg, ()).remove("a")),
        ("remove wrong count", lambda lib, reg: counter(lib, reg).remove("a", "b")),
        ("remove_by_labels not a dict", lambda lib, reg: counter(lib, reg).remove_by_labels([])),
        (
            "remove_by_labels unknown name",
            lambda lib, reg: counter(lib, reg).remove_by_labels({"x": "a"}),
        ),
    ]


@pytest.mark.g6
@pytest.mark.parametrize(("case", "call"), _bad_calls(), ids=[c for c, _ in _bad_calls()])
def test_fixed_bad_calls_raise_as_in_prometheus_client(
    case: str, call: Callable[[Any, Any], Any], tmp_path: Path
) -> None:
    store = kp.CollectorRegistry(store=f"sqlite:///{tmp_path}/c.db", node=NODE)
    try:
        outcomes = [
            _outcome(lambda lib=lib, reg=reg: call(lib, reg))[0]
            for lib, reg in (
                (prometheus_client, prometheus_client.CollectorRegistry()),
                (kp, kp.CollectorRegistry()),
                (kp, store),
            )
        ]
    finally:
        store.close()
    assert outcomes[0] is not None, f"{case}: prometheus_client accepts it"
    assert outcomes[1] == outcomes[0], f"{case}: in memory"
    assert outcomes[2] == outcomes[0], f"{case}: on SQLite"


@pytest.mark.parametrize("bound", [False, True], ids=["in memory", "on SQLite"])
def test_a_prometheus_client_registry_can_register_a_keepcount_registry(
    bound: bool, tmp_path: Path
) -> None:
    store = {"store": f"sqlite:///{tmp_path}/c.db", "node": NODE} if bound else {}
    kp_reg = kp.CollectorRegistry(**store)  # type: ignore[arg-type]
    try:
        counter = kp.Counter("jobs", "Jobs.", ["queue"], registry=kp_reg)
        counter.labels("q1").inc(2)
        kp.Histogram("latency_seconds", "Latency.", registry=kp_reg, buckets=[1]).observe(0.5)
        pc_reg = prometheus_client.CollectorRegistry()
        prometheus_client.Gauge("pc_only", "A prometheus_client gauge.", registry=pc_reg).set(7)
        pc_reg.register(kp_reg)
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            prometheus_client.Counter("jobs", "Again.", registry=pc_reg)
        text = _normalised_text(pc_reg)
        assert "pc_only 7.0\n" in text
        assert 'jobs_total{queue="q1"} 2.0\n' in text
        assert 'latency_seconds_bucket{le="1.0"} 1.0\n' in text
        assert text == _normalised_text(_Only(pc_reg, "pc_only")) + _normalised_text(kp_reg)
    finally:
        kp_reg.close()


class _Only:
    def __init__(self, registry: Any, name: str) -> None:
        self.registry, self.name = registry, name

    def collect(self) -> Iterator[Metric]:
        return (m for m in self.registry.collect() if m.name == self.name)


# -- differences the property found, fixed: kept as regressions --------------------------------
#
# Each is a shrunk program the property failed on before keepcount.prometheus was fixed.

A = Labels(("a", "b", "c"))
"""``.labels("a")`` on a metric with one label name."""
COUNTER_INC, COUNTER_RESET, GAUGE_SET, OBSERVE, INFO_SET = 0, 2, 2, 0, 0
"""Indexes into ``ACTIONS`` of the metric's type."""

FOUND: dict[str, Program] = {
    # remove() in a restarted process, before its registry binds to the store (first
    # value change, commit or collect), is lost: the stored series comes back.
    "remove after a restart": Program(
        (Declare("Counter", "m0", ("l",)),),
        (Act(On(0, A), COUNTER_INC), Restart(bind=False), Remove(0, A)),
    ),
    # clear() in a restarted process before its slot is read: the stored series
    # must stay cleared when they are read (the registry is started by then).
    "clear after a restart, before the slot is read": Program(
        (Declare("Counter", "m0", ("l",)),),
        (
            Act(On(0, A), COUNTER_INC),
            Restart(bind=False),
            Act(On(0, Labels(("b", "b", "b"))), COUNTER_INC, amount=0),
            Clear(0),
        ),
    ),
    # remove() then labels() again, before the slot is read: a fresh series.
    "remove and make again after a restart, before the slot is read": Program(
        (Declare("Summary", "m0", ("l",)),),
        (
            Act(On(0, A), OBSERVE, amount=0),
            Restart(bind=False),
            Remove(0, A),
            Act(On(0, A), OBSERVE, amount=0),
        ),
    ),
    # A child kept across remove() shares its series with the child labels() makes
    # next for the same label set (prometheus_client: the old child is detached).
    "a child kept across remove()": Program(
        (Declare("Counter", "m0", ("l",)),),
        (
            Child(On(0, A)),
            Remove(0, A),
            Act(On(0, A), COUNTER_INC, amount=0),
            Act(OnHandle(0), COUNTER_INC, amount=5),
        ),
    ),
    # Summary.observe(not a number) counts one in memory (as prometheus_client does)
    # but raises before marking the series for the next flush: the store misses it.
    "summary observe of a string, on SQLite": Program(
        (Declare("Summary", "m0"),),
        (Check(), Act(On(0, A), OBSERVE, amount="1")),
    ),
    # sum() of the slots starts from int 0: 0 + -0.0 is 0.0.
    "gauge of mode sum set to -0.0, on SQLite": Program(
        (Declare("Gauge", "m0", mode="sum"),),
        (Act(On(0, A), GAUGE_SET, amount=-0.0),),
    ),
    # prometheus_client keeps the int and its exposition raises; the store writes str(3).
    "info with a value that is not a str, on SQLite": Program(
        (Declare("Info", "m0"),),
        (Act(On(0, A), INFO_SET, info=(("version", 3),)),),
    ),
    # A registry that never changed a value, committed or collected opens nothing
    # (documented); the restart commits first then (see restart()): label sets made
    # by labels() alone come back at zero.
    "labels() only, then a restart": Program(
        (Declare("Counter", "m0", ("l",)),),
        (Child(On(0, A)), Restart(bind=False)),
    ),
    # ... also after a restart: the stored int 0 comes back an int.
    "reset(), a restart, then inc() of an int too large for a float": Program(
        (Declare("Counter", "m0"),),
        (Act(On(0, A), COUNTER_RESET), Restart(), Act(On(0, A), COUNTER_INC, amount=10**400)),
    ),
    # prometheus_client's reset() sets the int 0, and int arithmetic goes on from it.
    "reset() then inc() of an int too large for a float": Program(
        (Declare("Counter", "m0"),),
        (Act(On(0, A), COUNTER_RESET), Act(On(0, A), COUNTER_INC, amount=10**400)),
    ),
}


@pytest.mark.parametrize("name", list(FOUND))
def test_found_difference(name: str, tmp_path: Path) -> None:
    run_program(FOUND[name], tmp_path)


@pytest.mark.g6
@pytest.mark.parametrize("buckets", [(1.0, INF, INF), (math.nan,), (-INF, 1.0), (INF, INF)])
def test_bucket_bounds_no_store_can_hold_are_refused(buckets: tuple[float, ...]) -> None:
    """Documented: prometheus_client takes these; keepcount.prometheus refuses
    them in memory as in a store (which could not give them back as they were)."""
    prometheus_client.Histogram("h", "H.", registry=prometheus_client.CollectorRegistry(),
                                buckets=buckets)  # fmt: skip
    with pytest.raises(ValueError, match="Bucket bounds must be finite numbers"):
        kp.Histogram("h", "H.", registry=kp.CollectorRegistry(), buckets=buckets)


# -- the check can fail ----------------------------------------------------------------------


def test_the_differential_check_catches_a_mutant(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With ``CounterSeries.inc`` adding twice, the fixed program and the
    property both fail."""
    original = CounterSeries.inc

    def inc_twice(self: CounterSeries, amount: float) -> None:
        original(self, amount)
        original(self, amount)

    program = Program(
        (Declare("Counter", "m0", ("l",)),),
        (Act(On(0, Labels(("a", "b", "c"))), action=0, amount=1.5), Check()),
    )
    (tmp_path / "unmutated").mkdir()
    run_program(program, tmp_path / "unmutated")  # passes as it is
    monkeypatch.setattr(CounterSeries, "inc", inc_twice)
    with pytest.raises(AssertionError, match="expositions differ") as caught:
        run_program(program, tmp_path)
    assert 'm0_total{l="a"} 3.0' in str(caught.value)

    @settings(
        max_examples=100, deadline=None, derandomize=True, database=None, phases=[Phase.generate]
    )
    @given(program=programs())
    def fuzz(program: Program) -> None:
        with tempfile.TemporaryDirectory(dir=tmp_path) as directory:
            run_program(program, directory)

    with pytest.raises(AssertionError, match="differ"):
        fuzz()
