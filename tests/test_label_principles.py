"""Per-principle agreement with human labels: which principles help and which are noise, in
`cai label eval`'s metrics and in `cai constitution show --metrics`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import FakeEngine, PreferenceScore
from test_label import CONSTITUTION, QUALITY, hh_rows, write_jsonl

from cai.cli import main
from cai.stages.label_eval import EvalConfig, run_label_eval
from cai.stages.label_metrics import per_principle_agreement

HELPS = PreferenceScore(QUALITY)


def three_kinds(prompt: str, choice: int) -> float:
    """'harm' follows the qualities, 'honesty' always answers the first slot, 'kindness' prefers the worse answer."""
    if "less harmful" in prompt:
        return HELPS(prompt, choice)
    if "more honest" in prompt:
        return 2.0 if choice == 0 else 0.0
    return -HELPS(prompt, choice)


def test_per_principle_agreement_by_hand() -> None:
    rows = [("a", 0.9, 0.7, True), ("a", 0.2, 0.4, True), ("a", 0.5, 0.5, False), ("b", 0.8, 0.3, False)]
    a, b = per_principle_agreement(rows)
    assert (a.principle_id, a.agreement.k, a.agreement.n) == ("a", 1.5, 3)  # hit, miss, tie
    assert a.position_bias_rate == 0.0 and a.mean_confidence == pytest.approx((0.6 + 0.4 + 0) / 3)
    assert (b.agreement.k, b.position_bias_rate) == (0.0, 1.0)  # p = 0.55 (A) vs human B; its orders disagree


@pytest.fixture
def metrics(tmp_path: Path) -> Path:
    (tmp_path / "c.yaml").write_text(CONSTITUTION)
    write_jsonl(tmp_path / "hh.jsonl", hh_rows(24))
    cfg = EvalConfig(pairs=tmp_path / "hh.jsonl", constitution=tmp_path / "c.yaml", out=tmp_path / "eval", seed=1)
    summary = run_label_eval(cfg, engine=FakeEngine(three_kinds), progress=False)
    per = {p.principle_id: p for p in summary.metrics.per_principle}
    # i % 6 == 0: both answers have quality 0, a tie worth 1/2 for harm and kindness
    assert (per["harm"].agreement.k, per["harm"].agreement.n, per["harm"].position_bias_rate) == (22, 24, 0.0)
    assert (per["honesty"].agreement.k, per["honesty"].position_bias_rate) == (12, 1.0)
    assert per["kindness"].agreement.k == 2 and per["kindness"].agreement.high < 0.3
    assert per["harm"].agreement.low > 0.7
    assert "honesty" in summary.render() and "position-bias rate 1.000" in summary.render()
    return tmp_path


def test_constitution_show_adds_the_agreement_columns(metrics: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["constitution", "show", str(metrics / "c.yaml"), "--metrics", str(metrics / "eval" / "metrics.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(ln for ln in lines if ln.startswith("id "))
    assert head.split()[:9] == ["id", "weight", "share", "tags", "agree", "95%", "CI", "pairs", "pos-bias"]
    harm = next(ln for ln in lines if ln.startswith("harm "))
    assert harm.split()[4:8] == ["0.92", "0.74-0.98", "24", "0.00"]
    honesty = next(ln for ln in lines if ln.startswith("honesty "))
    assert honesty.split()[4:8] == ["0.50", "0.31-0.69", "24", "1.00"]


def test_constitution_show_metrics_errors_are_one_paragraph(metrics: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["constitution", "show", str(metrics / "c.yaml"), "--metrics", str(metrics / "nope.json")]) == 1
    assert "--metrics" in capsys.readouterr().err
    bad = metrics / "bad.json"
    bad.write_text(json.dumps({"rows_total": 3}))
    assert main(["constitution", "show", str(metrics / "c.yaml"), "--metrics", str(bad)]) == 1
    assert "not a `cai label eval` metrics.json" in capsys.readouterr().err
