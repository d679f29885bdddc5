"""A command that needs an optional extra names the ``pip install`` that fixes it.

A missing module is simulated by ``sys.modules[name] = None`` (an import of
it then raises ``ModuleNotFoundError``, as when it is not installed).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from keepcount.cli import main
from keepcount.cli.extras import MissingExtra, needs_extra, require


def run(monkeypatch: pytest.MonkeyPatch, missing: str, *args: str) -> tuple[int, str]:
    monkeypatch.setitem(sys.modules, missing, None)
    result = CliRunner().invoke(main, list(args))
    assert not isinstance(result.exception, ModuleNotFoundError), result.exception
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("missing", "args", "extra"),
    [
        ("kazoo", ["demo", "--coordinator", "zookeeper"], "cluster"),
        ("aetcd", ["demo"], "cluster"),
        ("matplotlib", ["demo"], "cluster"),
        ("aetcd", ["verify"], "cluster"),
        ("kazoo", ["verify", "--coordinator", "zookeeper"], "cluster"),
        ("cassandra", ["verify", "--store", "cassandra"], "cluster"),
        ("aetcd", ["bench", "failover"], "cluster"),
        ("cassandra", ["bench", "all"], "cluster"),
        ("cassandra", ["bench", "cassandra"], "cassandra"),
    ],
)
def test_a_missing_module_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, missing: str, args: list[str], extra: str
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may be started, but nothing is left behind either
    code, output = run(monkeypatch, missing, *args)
    assert code == 1, output
    assert f"keepcount {args[0]} needs the Python module {missing!r}" in output
    assert f"pip install 'keepcount[{extra}]'" in output
    assert list(tmp_path.iterdir()) == [], "the command started before it checked"


def test_a_benchmark_without_extras_does_not_ask_for_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aetcd", None)
    monkeypatch.setitem(sys.modules, "cassandra", None)
    require("bench", "cluster")  # nothing to check: no error


def test_a_lazy_import_of_an_optional_module_is_turned_into_the_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "kazoo", None)
    with pytest.raises(MissingExtra) as caught, needs_extra("demo", "cluster"):
        import kazoo  # noqa: F401
    assert isinstance(caught.value, click.ClickException)
    assert (caught.value.module, caught.value.extra) == ("kazoo", "cluster")


def test_any_other_missing_module_is_a_bug_raised_as_is() -> None:
    with pytest.raises(ModuleNotFoundError), needs_extra("demo", "cluster"):
        import keepcount.no_such_module  # type: ignore[import-not-found]  # noqa: F401


def test_the_command_line_prints_one_line_not_a_traceback() -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from keepcount.cli import main\n"
        "main(['demo'], prog_name='keepcount')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == (
        "Error: keepcount demo needs the Python module 'matplotlib', which is not installed: "
        "pip install 'keepcount[cluster]'"
    )
