"""VLLMEngine against a fake `vllm` module (no GPU here): what it asks vLLM for, how it reads the answers."""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

from cai.conversation import HH_STOP, to_hh
from cai.engines import load_engine
from cai.engines.base import SamplingConfig


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: Any = None
    index: int = 0


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass
class FakeLLM:
    """Records constructor kwargs and generate() calls; answers from `script` or with fixed log-probs."""

    kwargs: dict[str, Any]
    calls: list[tuple[list[Any], Any]] = field(default_factory=list)
    script: list[CompletionOutput] = field(default_factory=list)

    def get_tokenizer(self):
        return FakeLLM.tokenizer

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append((prompts, sampling_params))
        if isinstance(sampling_params, list):  # generation: one scripted output per request
            return [RequestOutput(p["prompt_token_ids"], [o]) for p, o in zip(prompts, self.script)]
        out = []
        for p in prompts:  # scoring: log-prob of token t at position k is -(t % 7 + k) / 10
            ids = p["prompt_token_ids"]
            lps: list[dict[int, Logprob] | None] = [None]
            lps += [{ids[k]: Logprob(-(ids[k] % 7 + k) / 10), 99999: Logprob(-0.01)} for k in range(1, len(ids))]
            out.append(RequestOutput(ids, [CompletionOutput("x", [5], "length")], lps))
        return out


class SamplingParams:
    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    module = types.ModuleType("vllm")
    created: list[FakeLLM] = []

    def make_llm(**kwargs):
        created.append(FakeLLM(kwargs))
        return created[-1]

    module.LLM = make_llm
    module.SamplingParams = SamplingParams
    FakeLLM.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    monkeypatch.setitem(sys.modules, "vllm", module)
    module.created = created
    return module


def test_constructor_passes_parallelism_and_memory_options(fake_vllm, tiny_model_dir):
    engine = load_engine("vllm", str(tiny_model_dir), tensor_parallel_size=4, gpu_memory_utilization=0.5,
                         enforce_eager=True)
    kwargs = fake_vllm.created[0].kwargs
    assert kwargs["model"] == str(tiny_model_dir)
    assert kwargs["tensor_parallel_size"] == 4 and kwargs["gpu_memory_utilization"] == 0.5
    assert kwargs["enable_prefix_caching"] is True and kwargs["enforce_eager"] is True
    assert engine.name == "vllm" and engine.model_id == str(tiny_model_dir)
    assert engine.stop_sequences == HH_STOP
    msgs = [{"role": "user", "content": "Hi"}]
    assert engine.render_chat(msgs, "Critique:") == to_hh(msgs, "Critique:")


def test_generate_maps_params_per_row_and_finish_reasons(fake_vllm, tiny_model_dir):
    engine = load_engine("vllm", str(tiny_model_dir))
    llm = fake_vllm.created[0]
    llm.script = [
        CompletionOutput("Paris.", [10, 11, 2], "stop", None),  # EOS
        CompletionOutput("Sure", [12, 13], "stop", "\n\nHuman:"),  # stop string
        CompletionOutput("and so", [14, 15, 16, 17], "length"),
        CompletionOutput("", [2], "stop", 2),  # a stop token id (end of turn)
    ]
    prompts = ["the quick", "yes", "Human: how do I bake bread?", "no"]
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=4, stop=HH_STOP, seed=100)
    out = engine.generate(prompts, sampling, seeds=[3, 1, 4, 1])

    sent, params = llm.calls[0]
    tok = FakeLLM.tokenizer
    assert [p["prompt_token_ids"] for p in sent] == [tok(p)["input_ids"] for p in prompts]
    assert [p.kwargs["seed"] for p in params] == [3, 1, 4, 1]
    for p in params:
        assert p.kwargs["temperature"] == 0.7 and p.kwargs["top_p"] == 0.9
        assert p.kwargs["max_tokens"] == 4 and p.kwargs["stop"] == list(HH_STOP) and p.kwargs["n"] == 1
    assert [g.finish_reason for g in out] == ["eos", "stop", "length", "eos"]
    assert [g.completion_tokens for g in out] == [3, 2, 4, 1]
    assert [g.prompt_tokens for g in out] == [len(tok(p)["input_ids"]) for p in prompts]
    assert out[0].text == "Paris."

    engine.generate(prompts[:2], sampling)  # default seeds: sampling.seed + i
    assert [p.kwargs["seed"] for p in llm.calls[1][1]] == [100, 101]


def test_choice_logprobs_sum_prompt_logprobs_of_the_choice_tokens(fake_vllm, tiny_model_dir):
    engine = load_engine("vllm", str(tiny_model_dir))
    tok = FakeLLM.tokenizer
    prompts, choices = ["the quick", "Which is less harmful?"], [[" A", " quick brown fox"], [" B", ""]]
    got = engine.choice_logprobs(prompts, choices)

    sent, params = fake_vllm.created[0].calls[0]
    assert params.kwargs["prompt_logprobs"] >= 0 and params.kwargs["max_tokens"] == 1
    assert len(sent) == 3  # the empty choice is never sent
    for prompt, cs, row in zip(prompts, choices, got):
        p = tok(prompt)["input_ids"]
        for c, value in zip(cs, row):
            ids = p + tok(c, add_special_tokens=False)["input_ids"]
            expected = sum(-(ids[k] % 7 + k) / 10 for k in range(len(p), len(ids)))
            assert math.isclose(value, expected, abs_tol=1e-9)
    assert got[1][1] == 0.0
