"""The HTML report of `keepcount verify`: what it says, escaped."""

from __future__ import annotations

from keepcount.verify.checker import Fault, Result
from keepcount.verify.report import _html


def results(valid: bool | None) -> dict[str, Result]:
    return {"valid": Result("valid", valid, "summary <all>"), "counter": Result("counter", valid,
            "0 lost", errors=["lost <b>1</b>"])}  # fmt: skip


def test_faults_not_run_are_named_with_the_reason() -> None:
    settings = {"unavailable_faults": {"partition": "needs <nft>: apt-get install -y nftables"}}
    page = _html(settings, results(True), [Fault("kill", "node-1", 1.0, 2.0)], [])
    assert "Asked for but not run here" in page
    assert "<b>partition</b>: needs &lt;nft&gt;: apt-get install -y nftables" in page


def test_nothing_is_said_when_every_fault_ran() -> None:
    page = _html({"unavailable_faults": {}}, results(True), [], [])
    assert "not run here" not in page


def test_the_verdict_and_every_text_is_escaped() -> None:
    page = _html({}, results(False), [Fault("partition", "node-2 (node-2.a, <x>)", 0, 1)], [])
    assert "<title>keepcount verify: INVALID</title>" in page
    assert "lost &lt;b&gt;1&lt;/b&gt;" in page and "summary &lt;all&gt;" in page
    assert "node-2 (node-2.a, &lt;x&gt;)" in page
