"""`cai run`: the whole chain on a tiny model, the schema of every stage's output, skip and resume,
a kill mid-stage (and a torn output line) ending with the same outputs as an uninterrupted run,
refusal of changed settings, --restart, and config errors with their lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cai.cli import main
from cai.engines.identity import stable_model_id
from cai.errors import CaiError
from cai.pipeline import (
    LAYOUT,
    STAGE_NAMES,
    RunLog,
    downstream,
    load_pipeline,
    plan,
    run_pipeline,
)
from cai.records import SFTRecord
from cai.stages.eval import PolicyEvalSummary
from cai.stages.eval_answers import AnswerRecord
from cai.stages.eval_judge import JudgedPair
from cai.stages.label import LabelRecord
from cai.stages.label_eval import EvalSummary
from cai.stages.mix import MixSummary
from cai.stages.pairs import PreferenceRow
from cai.store import read_records
from cai.train.ppo import PPOSummary
from cai.train.reward import RewardSummary
from cai.train.sft import SFTSummary

pytestmark = pytest.mark.usefixtures("one_thread")


def pipeline_yaml(tmp: Path, model: Path, repo: Path, run_dir: str = "run", **sections: dict[str, Any]) -> Path:
    """A pipeline at tiny settings: 4 prompts, 2 rounds, 1 feedback principle, 2 RM steps."""
    doc: dict[str, Any] = {
        "run_dir": str(tmp / run_dir),
        "model": str(model),
        "seed": 3,
        "constitution": str(repo / "constitutions" / "harmless.yaml"),
        "generate": {"prompts": str(repo / "examples" / "red_team_prompts.jsonl"), "limit": 4, "rounds": 2,
                     "max_new_tokens": 6, "batch_size": 2},
        "label": {"principles": 1, "batch_size": 4},
        "label_eval": {"pairs": str(repo / "examples" / "helpful_pairs.jsonl"), "limit": 4},
        "mix": {"human": [str(repo / "examples" / "helpful_pairs.jsonl")], "ai_count": 4, "human_count": 4,
                "test_size": 0.25},
        "rm": {"max_steps": 2, "batch_size": 2, "max_length": 64, "save_every": 1, "log_every": 1},
        "sft": {"max_steps": 2, "batch_size": 2, "max_length": 512, "test_size": 0.25, "save_every": 1,
                "log_every": 1},
        "ppo": {"max_steps": 2, "prompts_per_step": 2, "batch_size": 2, "max_new_tokens": 6, "ppo_epochs": 1,
                "save_every": 1, "sample_every": 1, "samples_per_log": 2},
        "eval": {"red_team_limit": 2, "helpful_limit": 2, "refusal_limit": 2, "max_new_tokens": 5, "principles": 1,
                 "bootstrap": 20},
    }
    for name, fields in sections.items():
        doc[name] = {**doc.get(name, {}), **fields}
    path = tmp / f"{run_dir}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def content(path: Path, model: type) -> dict[str, dict]:
    """Rows by id without the wall-clock timestamps."""
    rows = {}
    for r in read_records(path, model):
        d = r.model_dump(mode="json")
        for holder in (d, d.get("provenance"), (d.get("label") or {}).get("provenance")):
            if isinstance(holder, dict):
                holder.pop("created_at", None)
        if model is AnswerRecord:  # the policies' paths are in this run's directory
            d.pop("model")
            d.pop("policy_model")
        rows[r.id] = d
    return rows


@pytest.fixture(scope="module")
def full_run(tiny_model_dir: Path, repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run through the command line; returns its YAML."""
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = pipeline_yaml(tmp, tiny_model_dir, repo_root)
    assert main(["run", str(cfg), "--quiet"]) == 0
    return cfg


def run_dir_of(cfg: Path) -> Path:
    return Path(yaml.safe_load(cfg.read_text())["run_dir"])


def test_full_pipeline_writes_every_stage_in_its_documented_schema(full_run: Path, tiny_model_dir: Path,
                                                                   repo_root: Path) -> None:
    run = run_dir_of(full_run)
    sft = read_records(run / LAYOUT["generate"], SFTRecord)
    assert len(sft) == 4
    assert all(len(r.steps) == 2 and r.provenance.model == stable_model_id(tiny_model_dir) for r in sft)
    labels = read_records(run / LAYOUT["label"], LabelRecord)
    assert {r.source_id for r in labels} <= {r.id for r in sft} and labels
    assert all(r.source == "critique" and len(r.principles) == 1 and 0 <= r.label_prob <= 1 for r in labels)
    EvalSummary.model_validate_json((run / "label_eval" / "metrics.json").read_text())
    train = read_records(run / "mix" / "train.jsonl", PreferenceRow)
    test = read_records(run / "mix" / "test.jsonl", PreferenceRow)
    mix = MixSummary.model_validate_json((run / "mix" / "mix.json").read_text())
    assert mix.counts == {"train": {"ai-harmless": 3, "human-helpful": 3}, "test": {"ai-harmless": 1, "human-helpful": 1}}
    assert sorted(r.source for r in train + test) == ["ai-harmless"] * 4 + ["human-helpful"] * 4
    assert all(r.label_prob >= 0.5 and r.chosen[-1].role == "assistant" for r in train + test)
    rm = RewardSummary.model_validate_json((run / "rm" / "summary.json").read_text())
    assert rm.steps == 2 and rm.train_pairs == 6 and rm.test_pairs == 2
    final = json.loads((run / "rm" / "final" / "config.json").read_text())
    assert "cai_reward_mean" in final and (run / "rm" / "final" / "model.safetensors").is_file()
    sft_summary = SFTSummary.model_validate_json((run / "sft" / "summary.json").read_text())
    assert (sft_summary.steps, sft_summary.train_examples, sft_summary.test_examples) == (2, 3, 1)
    assert sft_summary.test_loss_after is not None and (run / "sft" / "final" / "model.safetensors").is_file()
    ppo = PPOSummary.model_validate_json((run / "ppo" / "summary.json").read_text())
    assert (ppo.steps, ppo.episodes) == (2, 4)
    assert ppo.prompt_mix == {"red_team_prompts.jsonl": 1, "helpful_pairs.jsonl": 1}  # red-team + helpful prompts
    for name in ("rm", "sft", "ppo"):
        metrics = [json.loads(x) for x in (run / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics if m["split"] == "train"] == [1, 2]
    answers = read_records(run / "eval" / "answers.jsonl", AnswerRecord)
    red_team = [json.loads(x)["prompt"] for x in (repo_root / "examples" / "red_team_prompts.jsonl").open()]
    for policy in ("initial", "sl-cai", "rl-cai"):  # held out: the red-team prompts after generate's 4
        mine = sorted((a for a in answers if a.policy == policy and a.prompt_set == "red_team"),
                      key=lambda a: a.prompt_index)
        assert [a.prompt[-1].content for a in mine] == red_team[4:6]
    policies = (tiny_model_dir, run / "sft" / "final", run / "ppo" / "final")
    assert {a.model for a in answers} == {stable_model_id(p) for p in policies}
    assert len({stable_model_id(p) for p in policies}) == 3  # two fine-tunes of one base stay apart
    summary = PolicyEvalSummary.model_validate_json((run / "eval" / "summary.json").read_text())
    assert [p.policy for p in summary.elo.harmless.policies] == ["initial", "sl-cai", "rl-cai"]
    assert summary.elo.harmless.pairs == 2 * 3 and summary.elo.helpful.pairs == 2 * 3
    assert summary.refusals is not None and summary.refusals.benign_prompts == 2

    log = RunLog.load(run)
    assert list(log.stages) == list(STAGE_NAMES)
    assert all(rec.status == "done" and rec.attempts == 1 for rec in log.stages.values())
    assert log.stages["generate"].wall_s > 0
    assert log.stages["generate"].summary["rows_total"] == 4
    resolved = json.loads((run / "config.json").read_text())
    # paths between stages come from run_dir; shared fields reach every stage
    assert resolved["stages"]["label"]["critique"] == str(run / LAYOUT["generate"])
    assert resolved["stages"]["rm"]["train_file"] == str(run / "mix" / "train.jsonl")
    assert resolved["stages"]["ppo"]["model"] == str(run / "sft" / "final")  # the SFT model is the PPO policy
    assert resolved["stages"]["ppo"]["reward_model"] == str(run / "rm" / "final")
    assert {resolved["stages"][s]["seed"] for s in ("generate", "label", "mix", "rm")} == {3}


def test_rerun_skips_every_done_stage_and_changes_nothing(full_run: Path, capsys: pytest.CaptureFixture) -> None:
    run = run_dir_of(full_run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "pipeline.json"}
    assert main(["run", str(full_run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("done, skipped") == len(STAGE_NAMES)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "pipeline.json"}
    assert after == before
    assert main(["run", str(full_run), "--plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[:2] for ln in lines] == [[s, "done"] for s in STAGE_NAMES]


class Crashing:
    """Wraps an engine; generate() raises after `fail_after` calls, as a kill would stop the run."""

    def __init__(self, engine: Any, fail_after: int):
        self.engine, self.fail_after, self.calls = engine, fail_after, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if self.calls >= self.fail_after:
            raise RuntimeError("simulated kill")
        self.calls += 1
        return self.engine.generate(*args, **kwargs)


def test_killed_mid_stage_then_rerun_equals_uninterrupted_run(
    full_run: Path, tiny_model_dir: Path, repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cai.engines import load_engine

    cfg = pipeline_yaml(tmp_path, tiny_model_dir, repo_root, run_dir="killed")
    pipe = load_pipeline(cfg)
    run, ref = run_dir_of(cfg), run_dir_of(full_run)

    # 1. killed in critique-revise: one batch (1 + 2 rounds x 2 calls) done, the second dies mid-way;
    #    the kill also tore the last line written.
    def crashing(kind: str, model: str | None, options: dict) -> Any:
        return Crashing(load_engine(kind, model, **options), fail_after=7)

    with pytest.raises(RuntimeError, match="simulated kill"):
        run_pipeline(pipe, engine_factory=crashing, progress=False, echo=lambda s: None)
    out = run / LAYOUT["generate"]
    lines = out.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2
    out.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])
    assert [i.status for i in plan(pipe)][:2] == ["partial", "pending"]

    # 2. killed in reward-model training after its first checkpoint
    from cai.train import reward

    original = reward.run_reward
    monkeypatch.setattr(reward, "run_reward", lambda config, resume=False, progress=True: original(
        config, resume, stop_after=1, progress=progress))
    with pytest.raises(CaiError, match="stopped after step 1"):
        run_pipeline(pipe, progress=False, echo=lambda s: None)
    assert (run / "rm" / "checkpoints" / "step-00000001").is_dir()
    monkeypatch.setattr(reward, "run_reward", original)

    # 3. the rerun finishes; every output equals the uninterrupted run's
    results = run_pipeline(pipe, progress=False, echo=lambda s: None)
    rm_at = STAGE_NAMES.index("rm")
    assert [(r.stage, r.status) for r in results] == [(s, "skipped") for s in STAGE_NAMES[:rm_at]] + [
        (s, "ran") for s in STAGE_NAMES[rm_at:]]
    assert content(out, SFTRecord) == content(ref / LAYOUT["generate"], SFTRecord)
    assert content(run / LAYOUT["label"], LabelRecord) == content(ref / LAYOUT["label"], LabelRecord)
    for name in ("train.jsonl", "test.jsonl"):
        assert (run / "mix" / name).read_bytes() == (ref / "mix" / name).read_bytes()
    assert content(run / "eval" / "answers.jsonl", AnswerRecord) == content(ref / "eval" / "answers.jsonl", AnswerRecord)
    assert content(run / "eval" / "judged.jsonl", JudgedPair) == content(ref / "eval" / "judged.jsonl", JudgedPair)
    for name in ("rm", "sft", "ppo"):
        mine = load_file(run / name / "final" / "model.safetensors")
        theirs = load_file(ref / name / "final" / "model.safetensors")
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    log = RunLog.load(run)
    assert log.stages["generate"].attempts == 2 and log.stages["rm"].attempts == 2
    assert all(rec.status == "done" for rec in log.stages.values())


def test_changed_setting_is_refused_until_restarted(
    tiny_model_dir: Path, repo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = pipeline_yaml(tmp_path, tiny_model_dir, repo_root, label_eval={"limit": 2})
    assert main(["run", str(cfg), "--quiet", "--until", "mix"]) == 0
    run = run_dir_of(cfg)
    assert not (run / "rm").exists()
    # a batch size does not change the outputs: still done
    assert main(["run", str(cfg), "--plan", "--set", "label.batch_size=2"]) == 0
    assert "label       done" in capsys.readouterr().out
    assert main(["run", str(cfg), "--quiet", "--until", "mix", "--set", "label.principles=2"]) == 1
    err = capsys.readouterr().err
    assert "label (changed: principles)" in err and "--restart label" in err
    old_generate = (run / LAYOUT["generate"]).read_bytes()
    assert main(["run", str(cfg), "--quiet", "--until", "mix", "--set", "label.principles=2",
                 "--restart", "label"]) == 0
    out = capsys.readouterr().out
    assert f"moved aside: {', '.join(downstream(['label']))}" in out
    assert "sft" not in downstream(["label"])
    assert "generate: done, skipped" in out
    assert (run / LAYOUT["generate"]).read_bytes() == old_generate
    assert all(len(r.principles) == 2 for r in read_records(run / LAYOUT["label"], LabelRecord))
    (old,) = (run / ".old").iterdir()
    assert sorted(p.name for p in old.iterdir()) == ["label", "label_eval", "mix"]


def test_config_errors_name_their_line_or_set(tmp_path: Path, tiny_model_dir: Path, repo_root: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    cfg = pipeline_yaml(tmp_path, tiny_model_dir, repo_root)
    assert main(["run", str(cfg), "--until", "nope"]) == 1
    assert "unknown stage 'nope'" in capsys.readouterr().err
    text = cfg.read_text().replace("  rounds: 2\n", "  rounds: 0\n").replace("  principles: 1\n", "  principle: 1\n")
    text = text.replace("\nrm:\n", "\nrm:\n  out_dir: elsewhere\n")  # a path the pipeline owns
    cfg.write_text(text)
    lines = text.splitlines()
    with pytest.raises(CaiError) as e:
        load_pipeline(cfg, {"mix.ratio": 0.5})
    msg = str(e.value)
    assert f"{cfg}:{lines.index('  rounds: 0') + 1}: generate.rounds: Input should be greater than or equal to 1" in msg
    assert f"{cfg}:{lines.index('  principle: 1') + 1}: label.principle: unknown key" in msg
    assert f"{cfg}:{lines.index('  out_dir: elsewhere') + 1}: rm.out_dir: set by the pipeline" in msg
    assert "--set: mix: Value error, give either ratio or ai_count" in msg
    assert not run_dir_of(cfg).exists()  # nothing ran


def test_compare_section_is_read_as_a_deprecated_alias_of_eval(tmp_path: Path, tiny_model_dir: Path,
                                                              repo_root: Path) -> None:
    cfg = pipeline_yaml(tmp_path, tiny_model_dir, repo_root)
    doc = yaml.safe_load(cfg.read_text())
    doc["compare"] = {"limit": 3, "max_new_tokens": 7}
    del doc["eval"]
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.warns(FutureWarning, match="`compare` is deprecated: it is now `eval`"):
        pipe = load_pipeline(cfg)
    ev = pipe.stages["eval"]
    assert (ev.red_team_limit, ev.max_new_tokens, ev.red_team_skip) == (3, 7, 4)
    assert [p.model for p in ev.policies] == [str(tiny_model_dir), str(run_dir_of(cfg) / "sft" / "final"),
                                              str(run_dir_of(cfg) / "ppo" / "final")]
    doc["eval"] = {"bootstrap": 20}
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(CaiError, match="both `compare` and `eval`"):
        load_pipeline(cfg)
