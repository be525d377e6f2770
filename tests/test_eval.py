"""`cai eval` on scripted engines: three policies with known tastes recovered on both axes, the
refusal rates by judge and rule, resume of the judged pairs after a crash, and the files written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeEngine, PreferenceScore
from scripted import ScriptedEngine

from cai.cli import main
from cai.errors import CaiError
from cai.stages.eval import EloSummary, PolicyEvalConfig, run_policy_eval
from cai.stages.eval_judge import JudgedPair, RefusalRecord
from cai.stages.eval_refusal import refusal_rates
from cai.store import read_records

ANSWERS = {"refuser": "I cannot help with that.", "helper": "Sure, here is a careful answer.",
           "reckless": "Here is the risky plan, step one."}
HARMLESS = {ANSWERS["refuser"]: 1.0, ANSWERS["helper"]: 0.5, ANSWERS["reckless"]: -1.5}
HELPFUL = {ANSWERS["helper"]: 1.0, ANSWERS["reckless"]: 0.3, ANSWERS["refuser"]: -1.5}


def judge_score(prompt: str, choice: int) -> float:
    """Pairwise: the axis's qualities (red-team prompts start 'RT'), plus a slot bias. Refusal question:
    the option that is true of the reply scores 0, the other -3."""
    if "Which option describes the reply" in prompt:
        refused = ANSWERS["refuser"] in prompt
        refuse_first = "(A) The reply declines" in prompt
        says_refuse = (choice == 0) == refuse_first
        return 0.0 if says_refuse == refused else -3.0
    quality = HARMLESS if "User: RT" in prompt else HELPFUL
    return PreferenceScore(quality, first_bonus=0.4)(prompt, choice)


def policy_engine(name: str) -> ScriptedEngine:
    engine = ScriptedEngine([lambda prompt, seed: (ANSWERS[name], "stop")])
    engine.model_id = f"scripted-{name}"
    return engine


def write_prompts(path: Path, tag: str, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{tag} question {i}?"}) + "\n" for i in range(n)))
    return path


@pytest.fixture
def config(tmp_path: Path) -> PolicyEvalConfig:
    return PolicyEvalConfig(
        policies=[{"name": n, "model": n} for n in ANSWERS], red_team=write_prompts(tmp_path / "rt.jsonl", "RT", 8),
        red_team_skip=2, helpful=write_prompts(tmp_path / "hp.jsonl", "HP", 6),
        benign=write_prompts(tmp_path / "bn.jsonl", "BN", 5), harmful=write_prompts(tmp_path / "hm.jsonl", "HM", 4),
        judge_model="judge", principles=1, batch_size=4, bootstrap=50, out=tmp_path / "eval",
    )


class Engines:
    """engine_for(model): scripted policies, one judge; counts loads and can crash the judge."""

    def __init__(self, judge_fail_after: int | None = None):
        self.judge = FakeEngine(judge_score, fail_after=judge_fail_after)
        self.loads: list[str | None] = []

    def __call__(self, model: str | None) -> Any:
        self.loads.append(model)
        return self.judge if model == "judge" else policy_engine(model)  # type: ignore[arg-type]


def test_known_tastes_are_recovered_on_both_axes(config: PolicyEvalConfig) -> None:
    summary = run_policy_eval(config, Engines(), progress=False)
    harmless = {p.policy: p for p in summary.elo.harmless.policies}
    helpful = {p.policy: p for p in summary.elo.helpful.policies}
    assert sorted(harmless, key=lambda k: harmless[k].elo) == ["reckless", "helper", "refuser"]
    assert sorted(helpful, key=lambda k: helpful[k].elo) == ["refuser", "reckless", "helper"]
    assert summary.elo.harmless.prompts == 6 and summary.elo.helpful.prompts == 6  # 8 - 2 skipped
    assert summary.elo.harmless.pairs == 6 * 3 and summary.elo.harmless.position_consistent == 1.0
    assert all(p.comparisons == 6 * 2 for p in summary.elo.harmless.policies)
    assert summary.elo.harmless.constitution == "harmless" and summary.elo.helpful.constitution == "helpful-honest"
    rates = {r.policy: r for r in summary.refusals.policies}  # type: ignore[union-attr]
    assert rates["refuser"].benign_refusal_judge.rate == 1.0 and rates["refuser"].benign_refusal_rule.rate == 1.0
    assert rates["helper"].benign_refusal_judge.rate == 0.0 and rates["reckless"].harmful_compliance_rule.rate == 1.0
    assert rates["refuser"].harmful_compliance_judge.rate == 0.0 and rates["helper"].benign_refusal_judge.n == 5
    assert all(r.disagreement.k == 0 and r.disagreement.n == 9 for r in rates.values())
    out = Path(config.out)
    assert EloSummary.model_validate_json((out / "elo.json").read_text()) == summary.elo
    assert (out / "elo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    judged = read_records(out / "judged.jsonl", JudgedPair)
    first = next(r for r in judged if r.axis == "helpful")
    assert first.label.provenance.constitution_name == "helpful-honest"  # type: ignore[union-attr]
    assert first.label.provenance.model == "fake-labeler-v1"  # type: ignore[union-attr]
    assert len(read_records(out / "refusals.jsonl", RefusalRecord)) == 3 * 9


def test_judged_pairs_resume_after_a_crash_and_match_an_uninterrupted_run(config: PolicyEvalConfig,
                                                                          tmp_path: Path) -> None:
    ref = run_policy_eval(config.model_copy(update={"out": tmp_path / "ref"}), Engines(), progress=False)
    crashing = Engines(judge_fail_after=2)  # two batches of pairs judged, then a kill
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_policy_eval(config, crashing, progress=False)
    out = Path(config.out)
    assert len(read_records(out / "judged.jsonl", JudgedPair)) == 8
    again = Engines()
    summary = run_policy_eval(config, again, progress=False)
    assert again.loads == ["judge"]  # every answer was on disk: no policy reloaded
    assert again.judge.logprob_calls[:3] == [4 * 2, 4 * 2, 2 * 2]  # the 10 harmless pairs left, 4 per call
    assert summary.elo == ref.elo

    def rows(path: Path) -> dict[str, Any]:
        out = {}
        for r in read_records(path, JudgedPair):
            d = r.model_dump(mode="json")
            d["label"]["provenance"].pop("created_at")
            out[r.id] = d
        return out

    assert rows(out / "judged.jsonl") == rows(tmp_path / "ref" / "judged.jsonl")


def test_a_policy_name_cannot_switch_models_on_resume(config: PolicyEvalConfig) -> None:
    run_policy_eval(config, Engines(), progress=False)
    policies = [{"name": "refuser", "model": "reckless"}, {"name": "helper", "model": "helper"}]
    moved = PolicyEvalConfig.model_validate({**config.model_dump(), "policies": policies})
    with pytest.raises(CaiError, match="policy 'refuser' from model refuser, but it is now reckless"):
        run_policy_eval(moved, Engines(), progress=False)


def test_refusal_rates_by_hand() -> None:
    rows = [("benign", 0.9, True), ("benign", 0.2, True), ("benign", 0.4, False), ("benign", 0.6, False),
            ("harmful", 0.3, False), ("harmful", 0.8, True)]
    r = refusal_rates("p", rows)  # type: ignore[arg-type]
    assert (r.benign_refusal_judge.k, r.benign_refusal_judge.n) == (2, 4)
    assert (r.benign_refusal_rule.k, r.harmful_compliance_judge.k, r.harmful_compliance_rule.k) == (2, 1, 1)
    assert r.benign_mean_p_refuse == pytest.approx(0.525) and r.harmful_mean_p_refuse == pytest.approx(0.55)
    assert (r.disagreement.k, r.disagreement.n) == (2, 6)  # (0.2, rule) and (0.6, no rule)
    # Wilson 95% for 2/4, by hand: centre (0.5 + 0.4802) / 1.9604 = 0.5, half 0.4302
    assert r.benign_refusal_judge.low == pytest.approx(0.1500, abs=1e-3)
    assert r.benign_refusal_judge.high == pytest.approx(0.8500, abs=1e-3)


def test_config_errors_are_one_paragraph(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "--policy", "a=x", "--out", str(tmp_path / "o")]) == 1
    assert "at least 2" in capsys.readouterr().err
    assert main(["eval", "--policy", "a=x", "--policy", "a=y", "--out", str(tmp_path / "o")]) == 1
    assert "repeated: a" in capsys.readouterr().err
    assert main(["eval", "--policy", "nonsense", "--policy", "b=y", "--out", str(tmp_path / "o")]) == 1
    assert "--policy NAME=MODEL" in capsys.readouterr().err
    empty = tmp_path / "rt.jsonl"
    write_prompts(empty, "RT", 2)
    assert main(["eval", "--policy", "a=x", "--policy", "b=y", "--red-team", str(empty), "--red-team-skip", "2",
                 "--out", str(tmp_path / "o")]) == 1
    assert "no prompts left after skipping the first 2" in capsys.readouterr().err


def test_shipped_prompt_sets_are_large_distinct_and_held_out(repo_root: Path) -> None:
    from cai.stages.inputs import load_prompts

    sets = {n: [c[-1].content for c in load_prompts(repo_root / "examples" / "eval" / f"{n}.jsonl")]
            for n in ("benign", "harmful", "red_team", "helpful")}
    assert len(sets["benign"]) >= 150 and len(sets["harmful"]) >= 150
    every = [p for v in sets.values() for p in v]
    assert len(set(every)) == len(every)
    training = {c[-1].content for c in load_prompts(repo_root / "examples" / "red_team_prompts.jsonl")}
    training |= {c[-1].content for c in load_prompts(repo_root / "examples" / "helpful_pairs.jsonl")}
    assert not training & set(every)


@pytest.mark.usefixtures("one_thread")
def test_cli_rates_two_tiny_models_and_a_rerun_resumes(tiny_model_dir: Path, repo_root: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    from tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=1)
    out = tmp_path / "eval"
    argv = ["eval", "--policy", f"a={tiny_model_dir}", "--policy", f"b={other}", "--judge-model", str(tiny_model_dir),
            "--red-team-limit", "2", "--helpful-limit", "2", "--refusal-limit", "2", "--max-new-tokens", "4",
            "--principles", "1", "--bootstrap", "10", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "harmless Elo (95% CI)" in printed and "benign refused (judge / rule)" in printed
    first = json.loads((out / "summary.json").read_text())
    assert first["answers"] == 2 * 8 and first["judged_pairs"] == 4 and first["refusal_judgements"] == 8
    before = {p: p.read_bytes() for p in out.glob("*.jsonl")}
    assert main(argv) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["seconds_per_judged_pair"] is None and again["elo"] == first["elo"]  # nothing judged twice
    assert {p: p.read_bytes() for p in out.glob("*.jsonl")} == before


def test_a_judge_that_follows_the_slot_rates_everyone_1000_and_the_report_says_so(config: PolicyEvalConfig,
                                                                                 tmp_path: Path) -> None:
    from cai.report import render_report

    slot_follower = Engines()
    slot_follower.judge = FakeEngine(lambda prompt, choice: 3.0 if choice == 0 else 0.0)
    summary = run_policy_eval(config.model_copy(update={"out": tmp_path / "run" / "eval"}), slot_follower,
                              progress=False)
    assert summary.elo.harmless.position_consistent == 0.0
    assert all(p.elo == pytest.approx(1000) for p in summary.elo.harmless.policies + summary.elo.helpful.policies)
    page = render_report(tmp_path / "run")
    assert "harmless: the judge gave the same verdict in both orders on only 0% of pairs" in page


def test_the_policy_that_is_also_the_judge_answers_last(config: PolicyEvalConfig) -> None:
    engines = Engines()
    run_policy_eval(config.model_copy(update={"judge_model": "refuser"}), engines, progress=False)
    assert engines.loads == ["helper", "reckless", "refuser", "refuser"]  # the caller's cache serves the last two
