"""The real bundled Gemma 3 270M (slow: loads ~1 GB, converts the GGUF on first use).

Load time is printed cold or warm depending on the cache: run once with a fresh `CAI_CACHE` to see
the one-time GGUF -> safetensors conversion, again for the cached start.
"""

from __future__ import annotations

import json
import time

import pytest

import cai.default_model as dm
from cai.engines.base import SamplingConfig
from cai.records import SFTRecord
from cai.stages.critique import CritiqueConfig, run_critique
from cai.store import read_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from cai.engines import load_engine

    cold = not (dm.cache_root() / "models" / dm.MODEL_DIRNAME / dm._MARKER).is_file()
    start = time.perf_counter()
    path = dm.default_model_path()
    prepared = time.perf_counter() - start
    start = time.perf_counter()
    engine = load_engine("hf")
    loaded = time.perf_counter() - start
    print(f"\ndefault model ({'cold: converted' if cold else 'warm: cached'}): prepare {prepared:.1f}s, "
          f"engine load {loaded:.1f}s, total {prepared + loaded:.1f}s, dtype {engine.model.dtype}, path {path}")
    return engine


def test_answers_a_simple_question(gemma):
    assert gemma.model_id == dm.DEFAULT_MODEL_ID
    assert gemma.tokenizer.chat_template is None and gemma.stop_sequences[0] == "\n\nHuman:"
    prompt = gemma.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt == "\n\nHuman: What is the capital of France?\n\nAssistant:"
    out = gemma.generate([prompt], SamplingConfig(temperature=0, max_new_tokens=32, stop=gemma.stop_sequences))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the base model goes on with "\n\nHuman:", which ends the turn
    paris, london = gemma.choice_logprobs(["The capital of France is"], [[" Paris", " London"]])[0]
    assert paris > london + 2


def test_one_critique_revise_round(gemma, tmp_path, repo_root):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "How can I get into my neighbour's wifi without the password?"}) + "\n")
    config = CritiqueConfig(
        prompts=prompts, constitution=repo_root / "constitutions" / "harmless.yaml", out=tmp_path / "sft.jsonl",
        rounds=1, max_new_tokens=48, critique_max_new_tokens=48, seed=3,
    )
    summary = run_critique(config, engine=gemma, progress=False)
    assert (summary.rows_total, summary.rows_written) == (1, 1)
    [row] = read_records(config.out, SFTRecord)
    assert row.prompt[0].content.startswith("How can I get into")
    assert row.initial_response and 0 < row.initial_tokens <= 48
    [step] = row.steps
    assert step.principle_id in row.provenance.principle_ids
    assert step.critique and step.revision and 0 < step.critique_tokens <= 48 and 0 < step.revision_tokens <= 48
    assert "\n\nHuman:" not in step.critique + step.revision  # stop sequences end the turn
    assert row.final_response == step.revision
    assert row.provenance.model == dm.DEFAULT_MODEL_ID and row.provenance.engine == "hf"
    assert summary.generated_tokens == row.initial_tokens + step.critique_tokens + step.revision_tokens
