"""The executors' shared pieces without Ray: fixed batch plans, the bad-row path, the driver loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scripted import ScriptedEngine
from test_critique import CONSTITUTION

from cai.errors import CaiError
from cai.executors import ExecutorSettings, open_executor
from cai.executors.base import plan_batches
from cai.records import SFTRecord
from cai.stages.critique import CritiqueConfig, CritiqueWorker, run_critique
from cai.store import read_records

PROMPTS = [f"question {i}: how do I fix my bike?" for i in range(7)]
PROMPTS[4] = "question 4: poison this prompt"


def refuse_poison(prompt: str, seed: int) -> tuple[str, str] | None:
    """An engine that refuses one prompt whatever its batch (as a too-long prompt would be)."""
    if "poison" in prompt:
        raise CaiError("prompt is longer than the model's context")
    return None


@pytest.fixture()
def workdir(tmp_path: Path, repo_root: Path) -> Path:
    (tmp_path / "c.yaml").write_text(CONSTITUTION)
    (tmp_path / "few_shot.yaml").write_text((repo_root / "prompts" / "critique_revision.yaml").read_text())
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return tmp_path


def config(workdir: Path, out: str = "out.jsonl", **kw) -> CritiqueConfig:
    base = {"prompts": workdir / "prompts.jsonl", "constitution": workdir / "c.yaml", "out": workdir / out,
            "rounds": 2, "batch_size": 3, "seed": 5}
    return CritiqueConfig(**(base | kw))


def test_batches_are_fixed_by_position_and_shards_keep_every_nth_item() -> None:
    assert plan_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert plan_batches(7, 2, (1, 2)) == [[1, 3], [5]]  # the shard's items 1, 3, 5 in batches of 2
    shards = [plan_batches(10, bs, (i, 3)) for i, bs in ((0, 2), (1, 4), (2, 1))]
    assert sorted(i for s in shards for b in s for i in b) == list(range(10))  # any batch size per shard


def test_a_row_the_engine_refuses_is_written_once_with_an_error_flag(workdir: Path) -> None:
    engine = ScriptedEngine(rules=[refuse_poison])
    summary = run_critique(config(workdir), engine=engine, progress=False)
    rows = {r.source_index: r for r in read_records(workdir / "out.jsonl", SFTRecord)}
    assert sorted(rows) == list(range(7)) and summary.rows_failed == 1
    bad = rows[4]
    assert bad.flags.error == "prompt is longer than the model's context" and bad.flags.empty
    assert bad.steps == [] and bad.final_response == ""
    assert all(r.flags.error is None and len(r.steps) == 2 for i, r in rows.items() if i != 4)
    # Batch 1 (rows 3-5) failed whole, then ran row by row; the other batches ran whole.
    assert engine.calls[:5] == [3] * 5 and engine.calls[5] == 3 and engine.calls[6:11] == [1] * 5
    again = ScriptedEngine(rules=[refuse_poison])
    assert run_critique(config(workdir), engine=again, progress=False).rows_skipped == 7
    assert again.calls == []  # not retried on resume


def test_ray_refuses_an_engine_loaded_in_this_process(workdir: Path) -> None:
    spec = CritiqueWorker(config(workdir), engine=ScriptedEngine())
    with pytest.raises(CaiError, match="cannot use an engine loaded in this process"):
        open_executor(ExecutorSettings(executor="ray"), spec)


def test_summary_has_a_line_per_worker(workdir: Path) -> None:
    summary = run_critique(config(workdir), engine=ScriptedEngine(), progress=False)
    (worker,) = summary.workers
    assert (worker.worker, worker.rows, worker.batches) == ("local", 7, 3)
    assert worker.tokens == summary.generated_tokens > 0
    assert "local: 7 rows in 3 batches" in summary.render()


def test_executor_flags_reach_the_configs(workdir: Path) -> None:
    from cai.cli import build_parser
    from cai.cli.cmd_generate import load_config
    from cai.cli.cmd_label import _LABEL_FLAGS, build_config
    from cai.stages.label import LabelConfig

    ray_flags = ["--executor", "ray", "--ray-address", "auto", "--ray-workers", "4", "--ray-gpus-per-worker", "2",
                 "--ray-cpus-per-worker", "3"]
    args = build_parser().parse_args(["generate", "--prompts", "p.jsonl", "--constitution", "c.yaml", "--out", "o.jsonl",
                                      *ray_flags])
    got = load_config(args)
    assert (got.executor, got.ray_address, got.ray_workers, got.ray_gpus_per_worker, got.ray_cpus_per_worker) == (
        "ray", "auto", 4, 2.0, 3)
    args = build_parser().parse_args(["label", "--pairs", "p.jsonl", "--constitution", "c.yaml", "--out", "o.jsonl",
                                      *ray_flags])
    got = build_config(args, LabelConfig, _LABEL_FLAGS, ("constitution", "out"), "cai label")
    assert (got.executor, got.ray_workers) == ("ray", 4)
    (workdir / "job.yaml").write_text("prompts: p.jsonl\nconstitution: c.yaml\nout: o.jsonl\nexecutor: ray\n")
    args = build_parser().parse_args(["generate", "--config", str(workdir / "job.yaml")])
    assert load_config(args).executor == "ray"


def test_pipeline_sections_choose_the_executor_without_changing_stage_keys(tmp_path: Path, repo_root: Path) -> None:
    from test_pipeline import pipeline_yaml

    from cai.pipeline import load_pipeline, stage_keys

    local = load_pipeline(pipeline_yaml(tmp_path, tmp_path / "model", repo_root))
    ray = {"executor": "ray", "ray_workers": 3, "ray_address": "auto"}
    on_ray = load_pipeline(pipeline_yaml(tmp_path, tmp_path / "model", repo_root, generate=ray, label=ray))
    assert on_ray.stages["generate"].executor == on_ray.stages["label"].executor == "ray"
    assert on_ray.stages["generate"].ray_workers == 3
    assert stage_keys(on_ray) == stage_keys(local)  # a run may move between executors and resume


def test_the_driver_refuses_a_row_its_batch_does_not_hold(workdir: Path) -> None:
    """A worker whose model or files differ from the driver's computes other ids: stop, write nothing."""
    from tqdm import tqdm

    from cai.executors import drive
    from cai.executors.base import Batch, BatchResult
    from cai.store import JsonlStore

    stranger = SFTRecord.model_validate_json(
        json.dumps({"id": "not-in-batch", "source_index": 0, "prompt": [{"role": "user", "content": "hi"}],
                    "initial_response": "", "initial_tokens": 0, "initial_finish": "stop", "steps": [],
                    "final_response": "", "flags": {}, "provenance": {
                        "constitution_name": "c", "constitution_sha256": "0" * 64, "principle_ids": [],
                        "model": "m", "engine": "e", "seed": 0, "sampling": {}}}))

    class OtherNode:
        def results(self, batches):
            yield BatchResult(index=0, records=[stranger], tokens=0, seconds=0.0, worker="worker-0")

    store = JsonlStore(workdir / "out.jsonl", SFTRecord, stage="critique", config={})
    with pytest.raises(CaiError, match="which batch 0 does not hold"), store:
        drive(OtherNode(), [Batch(0, ["expected-id"], [])], store, tqdm(disable=True))
    assert len(store) == 0
