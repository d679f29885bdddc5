"""Optional extras: a command that needs one says which ``pip install`` brings it.

``pip install keepcount`` is the library, the node and the checkers; the
commands that run a local cluster need the client libraries and tools of
an extra (``pyproject.toml``: ``etcd``, ``zookeeper``, ``cassandra``,
``bigtable``, and ``cluster``, which has them all).  Without one, a command
fails with a one-line ``click`` error naming the missing module and the
install that fixes it, never a ``ModuleNotFoundError`` traceback:

    Error: keepcount demo needs the Python module 'kazoo', which is not
    installed: pip install 'keepcount[cluster]'

Each command checks what it will use before it starts anything
(``require``), and runs under ``needs_extra`` too, which turns a missing
module found later, in a lazy import, into the same error.

Example::

    @click.command()
    def demo(coordinator: str) -> None:
        with needs_extra("demo", "cluster"):
            require("demo", "cluster", *coordinator_modules(coordinator), "matplotlib")
            ...  # the lazy imports and the work
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

import click

__all__ = ["EXTRAS", "MissingExtra", "coordinator_modules", "needs_extra", "require"]

EXTRAS: dict[str, tuple[str, ...]] = {
    "etcd": ("aetcd", "grpc"),
    "zookeeper": ("kazoo",),
    "cassandra": ("cassandra",),
    "bigtable": ("google.cloud.bigtable",),
    "cluster": ("aetcd", "grpc", "kazoo", "cassandra", "matplotlib"),
}
"""The top-level modules each extra of ``pyproject.toml`` installs (as far
as keepcount imports them)."""

_OPTIONAL = {m.split(".")[0] for modules in EXTRAS.values() for m in modules}


class MissingExtra(click.ClickException):
    """A command needs a module of an optional extra that is not installed."""

    def __init__(self, command: str, extra: str, module: str) -> None:
        super().__init__(
            f"keepcount {command} needs the Python module {module!r}, which is not "
            f"installed: pip install 'keepcount[{extra}]'"
        )
        self.module = module
        self.extra = extra


def coordinator_modules(coordinator: str) -> tuple[str, ...]:
    """The client modules a coordinator kind (``etcd``, ``zookeeper``) needs."""
    return EXTRAS[coordinator]


def require(command: str, extra: str, *modules: str) -> None:
    """Import ``modules`` (those the command will use; none: nothing to
    check); ``MissingExtra`` naming the first one missing and
    ``pip install 'keepcount[extra]'``."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            raise MissingExtra(command, extra, exc.name or name) from None


@contextmanager
def needs_extra(command: str, extra: str) -> Iterator[None]:
    """Turn a ``ModuleNotFoundError`` of an optional module raised inside into
    ``MissingExtra`` (any other missing module is a bug: raised as is)."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _OPTIONAL:
            raise
        raise MissingExtra(command, extra, exc.name or "?") from None
