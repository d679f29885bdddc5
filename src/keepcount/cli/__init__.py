"""The ``keepcount`` command line: one module per subcommand."""

from __future__ import annotations

import click

from keepcount import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="keepcount")
def main() -> None:
    """keepcount: counters that survive crashes, restarts and node failures."""


def _register() -> None:
    from keepcount.cli.bench import bench
    from keepcount.cli.cluster import cluster
    from keepcount.cli.demo import demo
    from keepcount.cli.node import node
    from keepcount.cli.verify import verify

    main.add_command(demo)
    main.add_command(cluster)
    main.add_command(bench)
    main.add_command(node)
    main.add_command(verify)


_register()
