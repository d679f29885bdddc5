"""A node's settings, declared once: ``NodeConfig``.

Each field carries its ``Option`` (in the field's metadata): the
``keepcount node`` flag, its help, how the command line spells None, and the
check that validates it.  From that one declaration come the validation
(``NodeConfig.__post_init__``: ``InvalidInput``), the click options of
``keepcount node`` (``keepcount.cli.node``) and the argv that starts a node
with this config (``NodeConfig.to_argv()``, used by a supervisor).

Example::

    config = NodeConfig(node="node-1", store="sqlite:////var/lib/app/c.db", claim_ttl=5.0)
    config.to_argv()
    # ['--id', 'node-1', '--store', 'sqlite:////var/lib/app/c.db', '--claim-ttl', '5.0']
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keepcount.commit import DEFAULT_FLUSH_INTERVAL, DEFAULT_IDEMPOTENCY_TTL
from keepcount.coordination.base import DEFAULT_TTL
from keepcount.errors import InvalidInput
from keepcount.metrics import DEFAULT_MAX_CHILDREN
from keepcount.naming import check_node_id

__all__ = [
    "DEFAULT_CLAIM_TIMEOUT",
    "DEFAULT_CLAIM_TTL",
    "DEFAULT_MAX_BODY",
    "KEY_PATTERN",
    "TOKEN_ENV",
    "NodeConfig",
    "Option",
    "options",
]

DEFAULT_MAX_BODY = 64 * 1024
"""Bytes of request body accepted.  An increment body is a few hundred bytes;
the limit only has to stop a client from making the node buffer megabytes."""

DEFAULT_CLAIM_TIMEOUT = 30.0
"""Seconds a starting node retries a held claim (or an unreachable store)
before it gives up and exits.  Long enough for an overlapping predecessor's
graceful shutdown (uvicorn's drain, then a final flush); a *killed*
predecessor's lock is already gone."""

DEFAULT_CLAIM_TTL = DEFAULT_TTL
"""Seconds a coordinator keeps the claim of a node that stopped renewing it
(killed, paused, cut off): see ``keepcount.coordination.DEFAULT_TTL``.  It
bounds how long a node id is unavailable after its host is lost; a *killed*
node's claim is evicted at once by the failure detector, which saw the
process exit."""

KEY_PATTERN = "[!-~]{1,255}"
"""An ``Idempotency-Key`` and a token: 1-255 printable ASCII characters, no spaces."""

TOKEN_ENV = "KEEPCOUNT_TOKEN"  # noqa: S105 (a variable name, not a secret)
"""The environment variable ``keepcount node`` reads its token from (never argv)."""

_KEY = re.compile(KEY_PATTERN)

Check = Callable[[str, Any], None]
"""Validates one field: ``check(name, value)`` raises ``InvalidInput``."""


@dataclass(frozen=True, slots=True)
class Option:
    """How a ``NodeConfig`` field is validated and given on the command line.

    ``flag``: the ``keepcount node`` option (default ``--`` + the field name
    with dashes); ``none_as``: the command-line value that means None (e.g.
    ``0`` for "no limit"); ``secret``: never rendered into argv (given by
    ``envvar``); ``check``: the validation, run on construction.
    """

    help: str
    flag: str | None = None
    metavar: str | None = None
    envvar: str | None = None
    secret: bool = False
    hidden: bool = False
    none_as: object = None
    check: Check | None = None


def _positive(what: str = "positive") -> Check:
    def check(name: str, value: Any) -> None:
        if not value > 0:
            raise InvalidInput(f"{name} must be {what}, not {value}")

    return check


def _positive_int(name: str, value: Any) -> None:
    if type(value) is not int or value < 1:
        raise InvalidInput(f"{name} must be a positive number of bytes, not {value}")


def _at_least_one(name: str, value: Any) -> None:
    if value < 1:
        raise InvalidInput(f"{name} must be at least 1, not {value}")


def _not_negative(name: str, value: Any) -> None:
    if not value >= 0:
        raise InvalidInput(f"{name} must not be negative, not {value}")


def _url(what: str) -> Check:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, str) or "://" not in value:
            raise InvalidInput(f"invalid {what} URL {value!r}: expected scheme://...")

    return check


def _token(name: str, value: Any) -> None:
    if not (isinstance(value, str) and _KEY.fullmatch(value)):
        raise InvalidInput("the token must be 1-255 printable ASCII characters (no spaces)")


def _node_id(name: str, value: Any) -> None:
    check_node_id(value)


def _opt(default: Any = dataclasses.MISSING, /, **option: Any) -> Any:
    return field(default=default, metadata={"option": Option(**option)})


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """What a node serves and how; validated on construction (``InvalidInput``).

    Every field is declared once, with its command-line option and its
    check (see the module docstring).
    """

    node: str = _opt(
        flag="--id", check=_node_id,
        help="Node id to claim: 1-63 letters, digits, '_', '.', '-'.",
    )  # fmt: skip
    store: str = _opt(
        check=_url("store"),
        help="Store URL, e.g. sqlite:////var/lib/app/counters.db (four slashes: absolute).",
    )
    token: str | None = _opt(
        None, envvar=TOKEN_ENV, secret=True, none_as="", check=_token,
        help="Require 'Authorization: Bearer TOKEN' on writes (prefer the env "
        "variable: arguments are visible to other users).",
    )  # fmt: skip
    idempotency_ttl: float = _opt(
        DEFAULT_IDEMPOTENCY_TTL, check=_positive(), help="Seconds an Idempotency-Key is remembered."
    )
    max_body: int = _opt(
        DEFAULT_MAX_BODY, check=_positive_int, help="Largest request body accepted, in bytes."
    )
    flush_interval: float | None = _opt(
        DEFAULT_FLUSH_INTERVAL, check=_positive(),
        help="Seconds between background flushes (HTTP increments are durable "
        "before they are answered regardless).",
    )  # fmt: skip
    max_children: int | None = _opt(
        DEFAULT_MAX_CHILDREN, none_as=0, check=_at_least_one,
        help="Label sets per counter before 422; 0: no limit.",
    )  # fmt: skip
    claim_timeout: float = _opt(
        DEFAULT_CLAIM_TIMEOUT, check=_not_negative,
        help="Seconds to keep retrying a node id another live process holds.",
    )  # fmt: skip
    coordinator: str | None = _opt(
        None, metavar="URL", check=_url("coordinator"),
        help="Claim the id through etcd://host:port,.../ns or zookeeper://host:port,.../ns "
        "(lease with a fencing epoch) instead of the store's own lock.",
    )  # fmt: skip
    """``etcd://...`` or ``zookeeper://...``: claim the id there (see ``keepcount.node``)."""
    claim_ttl: float = _opt(
        DEFAULT_CLAIM_TTL, check=_positive(),
        help="With --coordinator: seconds the claim outlives its last renewal.",
    )  # fmt: skip
    """Seconds the coordinator keeps a claim whose holder stopped renewing it."""
    advertise: str | None = _opt(
        None, metavar="URL",
        help="URL published with the claim (default: http://HOST:PORT of --listen).",
    )  # fmt: skip
    """The node's URL, published with its claim for the cluster tooling."""
    unsafe_ack_before_durable: bool = _opt(
        False, hidden=True,
        help="A deliberately broken node for testing `keepcount verify`: acknowledge "
        "increments before they are durable.",
    )  # fmt: skip
    """**A deliberately broken node, for testing the verifier only**: answer
    increments as soon as they are in memory (ignoring idempotency keys), as
    a counter library without durability would.  ``keepcount verify`` must
    find the acknowledged increments such a node loses when it is killed."""
    unsafe_settle_without_refusal: bool = _opt(
        False, hidden=True,
        help="A deliberately broken node for testing `keepcount verify`: answer "
        "`not_applied` when settling a key the store has not recorded, without "
        "recording the refusal.",
    )  # fmt: skip
    """**A deliberately broken node, for testing the verifier only**: settle a
    key (``GET /v1/idempotency/{key}``) by a store lookup alone: ``applied``
    if recorded, else ``not_applied`` - without writing the refusal and
    without looking at the increments queued here, so one still queued may
    land after it was reported not applied.  ``keepcount verify --mutant
    settle-without-refusal`` must find it counted."""
    unsafe_wall_clock_lease: bool = _opt(
        False, hidden=True,
        help="A deliberately broken node for testing `keepcount verify`: keep the "
        "claim's deadline on the wall clock.",
    )  # fmt: skip
    """**A deliberately broken node, for testing the verifier only**: its claim
    expires by the wall clock (``keepcount.coordination.wallclock``), so a
    clock jump forwards ends it.  The ``clock`` fault must find it."""

    def __post_init__(self) -> None:
        for spec in options():
            spec.check(getattr(self, spec.name))

    def to_argv(self) -> list[str]:
        """The ``keepcount node`` arguments that make this config (every field
        that is not its default; never the token: give it as ``TOKEN_ENV``,
        see ``to_env()``).  ``--listen`` is the caller's.  ``InvalidInput`` if
        a value has no command-line spelling (``flush_interval=None``)."""
        argv: list[str] = []
        for spec in options():
            value = getattr(self, spec.name)
            if spec.option.secret or (not spec.required and value == spec.default):
                continue
            if value is None:
                if spec.option.none_as is None:
                    raise InvalidInput(f"{spec.name}=None cannot be given to keepcount node")
                value = spec.option.none_as
            if spec.kind is bool:
                if value:
                    argv.append(spec.flag)
                continue
            argv += [spec.flag, str(value)]
        return argv

    def to_env(self) -> dict[str, str]:
        """The environment ``keepcount node`` needs besides ``to_argv()`` (the token)."""
        return {} if self.token is None else {TOKEN_ENV: self.token}


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """A ``NodeConfig`` field as a command-line option (see ``options()``)."""

    name: str
    flag: str
    kind: type
    optional: bool
    """None is a value of the field (no check runs on it)."""
    required: bool
    default: Any
    option: Option

    def check(self, value: Any) -> None:
        """Raise ``InvalidInput`` unless ``value`` is valid for this field."""
        if self.option.check is not None and not (value is None and self.optional):
            self.option.check(self.name, value)

    def parse(self, value: Any) -> Any:
        """A command-line value as the field's value (``none_as`` is None), checked."""
        none_as = self.option.none_as
        if none_as is not None and value == none_as:
            value = None
        self.check(value)
        return value


@functools.cache
def options() -> tuple[OptionSpec, ...]:
    """Every field of ``NodeConfig`` as an option, in declaration order."""
    hints = typing.get_type_hints(NodeConfig)
    return tuple(_spec(f, hints[f.name]) for f in dataclasses.fields(NodeConfig))


def _spec(f: dataclasses.Field[Any], hint: Any) -> OptionSpec:
    option: Option = f.metadata["option"]
    args = typing.get_args(hint) or (hint,)
    kinds = [k for k in args if k is not type(None)]
    required = f.default is dataclasses.MISSING
    default = None if required else f.default
    flag = option.flag or "--" + f.name.replace("_", "-")
    return OptionSpec(f.name, flag, kinds[0], len(kinds) < len(args), required, default, option)
