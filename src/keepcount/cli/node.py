"""``keepcount node``: serve one node's counters over HTTP (``keepcount.node.server``).

The options are made from ``NodeConfig`` (``keepcount.node.config``): each
field's flag, type, default and help, and its check as the option's
validation (an invalid value is a usage error naming the option, exit 2).
Only ``--listen`` is the command's own.  What happens once it serves, and
the exit statuses, are ``keepcount.node.server.serve``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from keepcount.errors import InvalidInput
from keepcount.node.config import NodeConfig, OptionSpec, options
from keepcount.node.server import DEFAULT_LISTEN, ListenError, parse_listen, serve
from keepcount.stores import sqlite_path

__all__ = ["config_options", "listen_option", "node", "parse_listen", "serve"]

F = Callable[..., Any]


def _checked(spec: OptionSpec) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            return spec.parse(value)
        except InvalidInput as exc:
            raise click.BadParameter(str(exc), ctx, param) from None

    return callback


def _option(spec: OptionSpec) -> Callable[[F], F]:
    opt = spec.option
    kw: dict[str, Any] = {"help": opt.help, "hidden": opt.hidden, "callback": _checked(spec)}
    if spec.kind is bool:
        kw["is_flag"] = True
    elif spec.required:
        kw.update(required=True, type=spec.kind)
    else:
        kw.update(type=spec.kind, show_default=spec.default is not None, metavar=opt.metavar)
        kw["default"] = (
            opt.none_as if spec.default is None and opt.none_as is not None else spec.default
        )
    if opt.envvar is not None:
        kw.update(envvar=opt.envvar, show_envvar=True)
    return click.option(spec.flag, spec.name, **kw)


def config_options(f: F) -> F:
    """Every ``NodeConfig`` field as a click option (the command gets them by field name)."""
    for spec in reversed(options()):
        f = _option(spec)(f)
    return f


def _listen(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    try:
        return parse_listen(value)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


listen_option = click.option(
    "--listen", default=DEFAULT_LISTEN, show_default=True, callback=_listen,
    help="HOST:PORT to serve on; PORT alone means 127.0.0.1:PORT.",
)  # fmt: skip


@click.command()
@config_options
@listen_option
def node(listen: tuple[str, int], **values: Any) -> None:
    """Serve one node: claim --id (in --coordinator, or in --store), restore its
    counters from --store, then serve HTTP.

    Exit status: 0 after SIGTERM/SIGINT (flushed, claim released); 1 if it
    could not start (or its final flush failed); 3 if it lost its claim
    while serving (a supervisor should start a new incarnation).
    """
    try:
        if values["store"].startswith("sqlite:"):
            sqlite_path(values["store"])
        config = NodeConfig(**values)
    except InvalidInput as exc:
        raise click.UsageError(str(exc)) from None
    raise SystemExit(run(config, *listen))


def run(config: NodeConfig, host: str, port: int, **kw: Any) -> int:
    """``serve()``, its start errors as click errors (``--listen``)."""
    try:
        return serve(config, host, port, **kw)
    except ListenError as exc:
        raise click.ClickException(str(exc)) from None
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
