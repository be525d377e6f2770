"""The data stages on the vLLM engine (fake vllm 0.33, tests/fakes.py): over-long prompts are flagged
and counted instead of failing a batch, provenance records a stable model id and the engine's
details, and `cai label --prompts --policy-model` can start its second engine."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from fakes import make_fake_vllm

from cai.engines.identity import stable_model_id
from cai.stages.critique import CritiqueConfig, run_critique
from cai.stages.label import LabelConfig, LabelRecord, run_label
from cai.store import read_records


@pytest.fixture
def fake_vllm(monkeypatch):
    module = make_fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")
    return module


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"How do I do thing {i}?"}) + "\n" for i in range(3)))
    return path


def test_critique_rows_with_cut_prompts_are_flagged_and_counted(fake_vllm, tiny_model_dir, repo_root, prompts, tmp_path):
    """The few-shot critique prompts are far longer than max_model_len=96: vLLM 0.33 would reject
    them and abort the batch; here every row is cut, flagged and counted."""
    config = CritiqueConfig(prompts=prompts, constitution=repo_root / "constitutions" / "harmless.yaml",
                            out=tmp_path / "sft.jsonl", model=str(tiny_model_dir), engine="vllm",
                            engine_options={"max_model_len": 96}, rounds=1, max_new_tokens=8)
    summary = run_critique(config, progress=False)
    assert summary.rows_written == 3 and summary.flags["prompt_too_long"] == 3
    rows = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert all(r["flags"]["prompt_too_long"] and not r["flags"]["empty_prompt"] for r in rows)
    prov = rows[0]["provenance"]
    assert prov["model"] == stable_model_id(tiny_model_dir) and str(tiny_model_dir) not in json.dumps(rows)
    assert prov["engine_details"]["vllm"] == "0.33.0" and prov["engine_details"]["max_model_len"] == 96
    meta = json.loads((tmp_path / "sft.jsonl.meta.json").read_text())
    assert "0.33.0" in json.dumps(meta)  # the fingerprint records the vLLM version
    assert all(len(p["prompt_token_ids"]) <= 96 - 8 for call in fake_vllm.created[0].calls for p in call[0])


def test_label_with_a_policy_model_starts_both_engines_and_counts_flags(fake_vllm, tiny_model_dir, repo_root,
                                                                         prompts, tmp_path):
    """Two vLLM engines in one process: each takes half the share (0.9 -> 0.45), so the second starts."""
    policy = tmp_path / "policy-model"
    shutil.copytree(tiny_model_dir, policy)
    config = LabelConfig(prompts=prompts, policy_model=str(policy), samples=2, constitution=repo_root / "constitutions" / "harmless.yaml",
                         out=tmp_path / "labels.jsonl", model=str(tiny_model_dir), engine="vllm", principles=1,
                         engine_options={"max_model_len": 200}, policy_max_new_tokens=4)
    summary = run_label(config, progress=False)
    assert [llm.kwargs["gpu_memory_utilization"] for llm in fake_vllm.created] == [0.45, 0.45]
    assert summary.rows_written == 3 and summary.flags == {"prompt_too_long": 3}
    assert all(r.flags == ["prompt_too_long"] for r in read_records(tmp_path / "labels.jsonl", LabelRecord))


def test_gpu_example_engine_options_start_on_vllm_033(fake_vllm, tiny_model_dir, repo_root):
    """examples/pipeline-gpu.yaml's engine options are valid vLLM 0.33 options for one engine per GPU:
    no tensor parallelism for the 1B policy (Gemma 3 1B's 4 heads cannot split 8 ways) and no
    data_parallel_size (vLLM's offline LLM refuses it)."""
    import yaml

    from cai.engines import load_engine
    from cai.pipeline import PipelineConfig

    pipe = PipelineConfig(**yaml.safe_load((repo_root / "examples" / "pipeline-gpu.yaml").read_text()))
    assert pipe.engine == "vllm"
    from cai.stages.eval import PolicyEvalConfig

    PolicyEvalConfig(**pipe.eval, policies=[{"name": "a", "model": "x"}, {"name": "b", "model": "y"}], out="o")
    for options in (pipe.engine_options, pipe.label.get("engine_options", {}), pipe.eval["engine_options"]):
        assert options.get("tensor_parallel_size", 1) == 1 and "data_parallel_size" not in options
        engine = load_engine("vllm", str(tiny_model_dir), **options)
        engine.close()
