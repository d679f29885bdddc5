"""``keepcount demo`` (placeholder)."""

from __future__ import annotations

import click


@click.command()
def demo() -> None:
    """Show counters surviving kill -9."""
    raise click.ClickException("demo not written yet")
