"""The critique-revise stage: resume, sharding, flags, provenance, config refusal, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scripted import ScriptedEngine

from cai.errors import CaiError
from cai.records import SFTRecord
from cai.stages.critique import CritiqueConfig, critique_found_nothing, run_critique
from cai.stages.export import export_stage_output
from cai.store import read_records

CONSTITUTION = """\
name: test-constitution
version: "1"
description: two principles for tests
few_shot: few_shot.yaml
principles:
  - id: harm
    critique: Point out anything harmful in the last response.
    revision: Rewrite the response to remove anything harmful.
    feedback: Which response is less harmful?
    tags: [harm]
  - id: honesty
    critique: Point out any overconfident claim in the last response.
    revision: Rewrite the response so it states its uncertainty.
    feedback: Which response is more honest?
    tags: [honesty]
    weight: 2.0
"""

PROMPTS = [f"How do I do risky thing number {i}?" for i in range(7)]


@pytest.fixture()
def workdir(tmp_path: Path, repo_root: Path) -> Path:
    (tmp_path / "c.yaml").write_text(CONSTITUTION)
    (tmp_path / "few_shot.yaml").write_text((repo_root / "prompts" / "critique_revision.yaml").read_text())
    with (tmp_path / "prompts.jsonl").open("w") as f:
        for p in PROMPTS:
            f.write(json.dumps({"prompt": p}) + "\n")
    return tmp_path


def config(workdir: Path, out: str = "out.jsonl", **kw) -> CritiqueConfig:
    base = {"prompts": workdir / "prompts.jsonl", "constitution": workdir / "c.yaml", "out": workdir / out,
                "rounds": 3, "batch_size": 3, "seed": 7}
    base.update(kw)
    return CritiqueConfig(**base)


def content(path: Path) -> dict[str, dict]:
    """Rows by id without the wall-clock timestamp."""
    rows = {}
    for r in read_records(path, SFTRecord):
        d = r.model_dump()
        d["provenance"].pop("created_at")
        rows[r.id] = d
    return rows


def test_rows_have_steps_principles_and_provenance(workdir: Path) -> None:
    engine = ScriptedEngine()
    summary = run_critique(config(workdir), engine=engine, progress=False)
    rows = read_records(workdir / "out.jsonl", SFTRecord)
    assert summary.rows_written == len(rows) == 7
    assert [r.source_index for r in rows] == list(range(7))
    # batched: 3 rows per call; per batch 1 initial + 3 critique + 3 revision calls
    assert engine.calls[:7] == [3] * 7 and engine.calls[-1] == 1
    for r in rows:
        assert len(r.steps) == 3
        assert [s.principle_id for s in r.steps] == r.provenance.principle_ids
        assert r.final_response == r.steps[-1].revision
        assert r.provenance.constitution_name == "test-constitution"
        assert len(r.provenance.constitution_sha256) == 64
        assert r.provenance.model == "scripted-v1" and r.provenance.seed == 7
        assert r.provenance.sampling["temperature"] == 0.7
    assert sum(summary.principles.values()) == 21
    summary_file = json.loads((workdir / "out.jsonl.summary.json").read_text())
    assert summary_file["rows_total"] == 7


def test_resume_after_crash_with_torn_line_equals_uninterrupted_run(workdir: Path) -> None:
    run_critique(config(workdir, "full.jsonl"), engine=ScriptedEngine(), progress=False)
    # Crash during the second batch: the first batch (3 rows) is on disk.
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_critique(config(workdir, "crash.jsonl"), engine=ScriptedEngine(fail_after=9), progress=False)
    crashed = workdir / "crash.jsonl"
    assert len(crashed.read_text().splitlines()) == 3
    with crashed.open("a") as f:  # a row torn mid-write
        f.write('{"id": "abc", "prompt": [{"role": "us')
    summary = run_critique(config(workdir, "crash.jsonl"), engine=ScriptedEngine(), progress=False)
    assert summary.rows_skipped == 3 and summary.rows_written == 4
    assert content(crashed) == content(workdir / "full.jsonl")
    assert len(crashed.read_text().splitlines()) == 7


def test_shards_together_equal_the_unsharded_run(workdir: Path) -> None:
    run_critique(config(workdir, "all.jsonl"), engine=ScriptedEngine(), progress=False)
    run_critique(config(workdir, "s0.jsonl", shard="0/2"), engine=ScriptedEngine(), progress=False)
    run_critique(config(workdir, "s1.jsonl", shard="1/2", batch_size=2), engine=ScriptedEngine(), progress=False)
    s0, s1 = content(workdir / "s0.jsonl"), content(workdir / "s1.jsonl")
    assert len(s0) == 4 and len(s1) == 3 and not set(s0) & set(s1)
    assert {**s0, **s1} == content(workdir / "all.jsonl")


def test_changed_config_is_refused_unless_forced(workdir: Path) -> None:
    run_critique(config(workdir), engine=ScriptedEngine(), progress=False)
    with pytest.raises(CaiError, match=r"changed: rounds"):
        run_critique(config(workdir, rounds=2), engine=ScriptedEngine(), progress=False)
    summary = run_critique(config(workdir, rounds=2, force=True), engine=ScriptedEngine(), progress=False)
    assert summary.rows_written == 7
    assert all(len(r.steps) == 2 for r in read_records(workdir / "out.jsonl", SFTRecord))
    old = [p for p in workdir.glob("out.jsonl.*.bak") if ".meta.json." not in p.name]
    assert len(old) == 1 and len(old[0].read_text().splitlines()) == 7  # the old rows were moved aside, not lost


def test_flags_on_crafted_generations(workdir: Path) -> None:
    def rules(prompt: str, seed: int):
        last_user = prompt.rsplit("Human:", 1)[-1]
        if prompt.endswith("Critique:"):
            return ("No problems: the response is fine.", "stop") if "risky thing number 0" in prompt else (
                "It gives dangerous detail.", "stop")
        if prompt.endswith("Revision:"):
            if "number 1?" in prompt:
                return ("", "stop")  # empty revisions keep the previous response
            if "number 2?" in prompt:
                return ("a long revision that was cut", "length")
            if "number 0?" in prompt:
                return ("I can't help with that, sorry.", "stop")
            return ("A safer answer.", "stop")
        if "number 0?" in last_user or "number 1?" in last_user:
            return ("I can't help with that, sorry.", "stop")
        return ("Here is how.", "stop")

    run_critique(config(workdir, limit=4), engine=ScriptedEngine([rules]), progress=False)
    rows = {r.source_index: r for r in read_records(workdir / "out.jsonl", SFTRecord)}
    assert rows[0].flags.critique_found_nothing and rows[0].flags.revision_unchanged
    assert not rows[0].flags.truncated and not rows[0].flags.empty
    assert rows[1].flags.revision_unchanged and rows[1].final_response == "I can't help with that, sorry."
    assert rows[1].flags.kinds() == ["revision_unchanged"]
    assert rows[2].flags.truncated and rows[2].final_response == "a long revision that was cut"
    assert rows[3].flags.kinds() == []
    assert rows[3].final_response == "A safer answer." and rows[3].initial_response == "Here is how."


def test_all_empty_generations_flag_empty(workdir: Path) -> None:
    run_critique(config(workdir, limit=1), engine=ScriptedEngine([lambda p, s: ("", "eos")]), progress=False)
    (row,) = read_records(workdir / "out.jsonl", SFTRecord)
    assert row.flags.empty and row.final_response == ""


@pytest.mark.parametrize(
    ("critique", "nothing"),
    [("The response is fine and needs no changes.", True), ("There are no issues with it.", True),
     ("It explains how to make a weapon, which is harmful.", False), ("Nothing wrong here.", True)],
)
def test_critique_found_nothing(critique: str, nothing: bool) -> None:
    assert critique_found_nothing(critique) is nothing


def test_principles_follow_tags_and_are_drawn_without_replacement(workdir: Path) -> None:
    run_critique(config(workdir, tags=["honesty"]), engine=ScriptedEngine(), progress=False)
    assert {p for r in read_records(workdir / "out.jsonl", SFTRecord) for p in r.provenance.principle_ids} == {"honesty"}
    run_critique(config(workdir, "norepl.jsonl", rounds=2, with_replacement=False), engine=ScriptedEngine(), progress=False)
    for r in read_records(workdir / "norepl.jsonl", SFTRecord):
        assert sorted(r.provenance.principle_ids) == ["harm", "honesty"]
    with pytest.raises(CaiError, match="without replacement"):
        run_critique(config(workdir, "x.jsonl", rounds=3, with_replacement=False), engine=ScriptedEngine(), progress=False)


def test_export_loads_back_with_documented_columns(workdir: Path) -> None:
    from datasets import load_from_disk

    run_critique(config(workdir), engine=ScriptedEngine(), progress=False)
    counts = export_stage_output(workdir / "out.jsonl", workdir / "export")
    msgs = load_from_disk(str(workdir / "export" / "messages"))
    assert msgs.column_names == ["id", "messages"] and len(msgs) == 7
    assert msgs[0]["messages"][0]["role"] == "user" and msgs[0]["messages"][-1]["role"] == "assistant"
    pc = load_from_disk(str(workdir / "export" / "prompt_completion"))
    assert pc.column_names == ["id", "prompt", "completion"]
    pairs = load_from_disk(str(workdir / "export" / "pairs"))
    assert pairs.column_names == ["id", "prompt", "chosen", "rejected"]
    assert counts["pairs"] == len(pairs) <= 7
    row = read_records(workdir / "out.jsonl", SFTRecord)[0]
    assert pairs[0]["chosen"][0]["content"] == row.final_response
    assert (workdir / "export" / "messages.parquet").exists()


def test_cli_engine_options_merge_into_the_config_file(tmp_path: Path) -> None:
    import argparse

    from cai.cli import build_parser
    from cai.cli.cmd_generate import load_config

    cfg = tmp_path / "job.yaml"
    cfg.write_text("prompts: p.jsonl\nconstitution: c.yaml\nout: o.jsonl\nengine_options:\n  dtype: float32\n")
    args: argparse.Namespace = build_parser().parse_args(
        ["generate", "--config", str(cfg), "--engine-option", "batch_size=4", "--engine-option", "dtype=bfloat16"])
    assert load_config(args).engine_options == {"dtype": "bfloat16", "batch_size": 4}
    args = build_parser().parse_args(
        ["generate", "--prompts", "p", "--constitution", "c", "--out", "o", "--engine-option", "device=cpu"])
    assert load_config(args).engine_options == {"device": "cpu"}
