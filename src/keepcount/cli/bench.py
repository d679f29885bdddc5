"""``keepcount bench`` (placeholder until the benchmarks land)."""

from __future__ import annotations

import click


@click.command()
def bench() -> None:
    """Run the benchmarks of DESIGN §9."""
    raise click.ClickException("benchmarks not written yet")
