"""VLLMEngine against a fake `vllm` 0.33 (tests/fakes.py; no GPU here): what it asks vLLM for, how it
reads the answers, and the 0.33 behaviours that would break a first GPU run (issue 12)."""

from __future__ import annotations

import sys

import pytest
from fakes import CompletionOutput, FakeLLM, fake_logprob, make_fake_vllm

from cai.conversation import HH_STOP, to_hh
from cai.engines import load_engine
from cai.engines.base import SamplingConfig, row_flag
from cai.engines.identity import stable_model_id
from cai.errors import CaiError


@pytest.fixture
def fake_vllm(monkeypatch):
    module = make_fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")  # restored after the test
    return module


def ids_of(engine, text: str) -> list[int]:
    return engine.tokenizer(text)["input_ids"]


def test_constructor_passes_options_and_records_a_stable_id(fake_vllm, tiny_model_dir):
    engine = load_engine("vllm", str(tiny_model_dir), tensor_parallel_size=4, gpu_memory_utilization=0.5,
                         enforce_eager=True)
    kwargs = fake_vllm.created[0].kwargs
    assert kwargs["model"] == str(tiny_model_dir)
    assert kwargs["tensor_parallel_size"] == 4 and kwargs["gpu_memory_utilization"] == 0.5
    assert kwargs["enable_prefix_caching"] is True and kwargs["enforce_eager"] is True
    assert engine.name == "vllm" and engine.model_id == stable_model_id(tiny_model_dir)
    assert str(tiny_model_dir) not in engine.model_id
    details = engine.details()
    assert details["vllm"] == "0.33.0" and details["batch_invariant"] is False
    assert details["tensor_parallel_size"] == 4 and details["enforce_eager"] is True and details["max_model_len"] == 1024
    assert engine.stop_sequences == HH_STOP
    msgs = [{"role": "user", "content": "Hi"}]
    assert engine.render_chat(msgs, "Critique:") == to_hh(msgs, "Critique:")


def test_unknown_or_unsupported_options_are_clear_errors(fake_vllm, tiny_model_dir):
    with pytest.raises(CaiError, match="rejected an engine option.*tensor_parallel"):
        load_engine("vllm", str(tiny_model_dir), tensor_parallel=2)
    with pytest.raises(CaiError, match="data_parallel_size.*--shard"):
        load_engine("vllm", str(tiny_model_dir), data_parallel_size=8)
    assert fake_vllm.gpu.used == 0


@pytest.mark.parametrize("version", ["0.8.5", "0.34.0", "dev"])
def test_unsupported_vllm_version_is_refused_at_start(monkeypatch, tiny_model_dir, version):
    monkeypatch.setitem(sys.modules, "vllm", make_fake_vllm(version))
    with pytest.raises(CaiError, match=r"vllm >=0\.33,<0\.34"):
        load_engine("vllm", str(tiny_model_dir))


def test_generate_maps_params_per_row_and_every_finish_reason(fake_vllm, tiny_model_dir):
    engine = load_engine("vllm", str(tiny_model_dir))
    llm = fake_vllm.created[0]
    llm.script = [
        CompletionOutput("Paris.", [10, 11, 2], "stop", None),  # EOS
        CompletionOutput("Sure", [12, 13], "stop", "\n\nHuman:"),  # stop string
        CompletionOutput("and so", [14, 15, 16, 17], "length"),
        CompletionOutput("", [2], "stop", 2),  # a stop token id (end of turn)
        CompletionOutput("half", [20], "abort"),
        CompletionOutput("", [], "error"),
        CompletionOutput("la la la", [21, 21, 21], "repetition"),
    ]
    prompts = ["the quick", "yes", "Human: how do I bake bread?", "no", "a", "b", "c"]
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=4, stop=HH_STOP, seed=100)
    out = engine.generate(prompts, sampling, seeds=[3, 1, 4, 1, 5, 9, 2])

    sent, params = llm.calls[0]
    assert [p["prompt_token_ids"] for p in sent] == [ids_of(engine, p) for p in prompts]
    assert [p.seed for p in params] == [3, 1, 4, 1, 5, 9, 2]
    for p in params:
        assert (p.temperature, p.top_p, p.max_tokens, p.stop, p.n) == (0.7, 0.9, 4, list(HH_STOP), 1)
    assert [g.finish_reason for g in out] == ["eos", "stop", "length", "eos", "abort", "error", "repetition"]
    assert [g.completion_tokens for g in out] == [3, 2, 4, 1, 1, 0, 3]
    assert out[0].text == "Paris." and all(g.flag is None for g in out)

    engine.generate(prompts[:2], sampling)  # default seeds: sampling.seed + i
    assert [p.seed for p in llm.calls[1][1]] == [100, 101]


def test_overlong_and_empty_prompts_are_flagged_not_failing_the_batch(fake_vllm, tiny_model_dir):
    """vLLM 0.33 raises on a prompt >= max_model_len or an empty one and aborts the whole call."""
    engine = load_engine("vllm", str(tiny_model_dir), max_model_len=64)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=8)
    long = "the quick brown fox " * 40
    out = engine.generate([long, "", "hi"], sampling)
    assert out[0].flag == "prompt_too_long" and out[0].prompt_tokens == 64 - 8 and out[0].finish_reason == "length"
    assert (out[1].flag, out[1].finish_reason, out[1].completion_tokens) == ("empty_prompt", "skipped", 0)
    assert out[2].flag is None and out[2].completion_tokens == 8
    sent = [p["prompt_token_ids"] for p in fake_vllm.created[0].calls[0][0]]
    full = ids_of(engine, long)
    assert sent == [full[:1] + full[len(full) - 55:], ids_of(engine, "hi")]  # first token + the end

    scores = engine.choice_logprobs([long, "", "hi"], [["A", "B"]] * 3)
    assert [row_flag(s) for s in scores] == ["prompt_too_long", "empty_prompt", None]
    assert list(scores[1]) == [0.0, 0.0] and all(v < 0 for v in scores[0])

    skip = load_engine("vllm", str(tiny_model_dir), max_model_len=64, overlong="skip", gpu_memory_utilization=0.05)
    got = skip.generate([long, "hi"], sampling)
    assert (got[0].finish_reason, got[0].flag) == ("skipped", "prompt_too_long") and got[1].completion_tokens == 8


def test_single_token_choices_are_one_cached_request_per_prompt(fake_vllm, tiny_model_dir):
    """No prompt_logprobs (which skip the prefix cache and score every prompt position): one
    max_tokens=1 request per prompt with logprob_token_ids = the choices."""
    engine = load_engine("vllm", str(tiny_model_dir))
    llm = fake_vllm.created[0]
    prompts = ["The answer is (", "Which is less harmful? ("]
    got = engine.choice_logprobs(prompts, [["A", "B"], ["B", "A"]])
    sent, params = llm.calls[0]
    assert len(llm.calls) == 1 and len(sent) == 2 and llm.cache_skipping_requests == 0 and llm.scored_positions == 0
    a, b = ids_of(engine, "A")[0], ids_of(engine, "B")[0]
    for p, prompt in zip(params, prompts):
        assert (p.max_tokens, p.detokenize, p.prompt_logprobs, sorted(p.logprob_token_ids)) == (1, False, None, sorted([a, b]))
    n0, n1 = len(ids_of(engine, prompts[0])), len(ids_of(engine, prompts[1]))
    assert got == [[fake_logprob(a, n0), fake_logprob(b, n0)], [fake_logprob(b, n1), fake_logprob(a, n1)]]


@pytest.mark.parametrize("v2_runner", [True, False], ids=["v2-token-ids", "v1-prompt-logprobs"])
def test_multi_token_choices_score_only_their_positions(fake_vllm, tiny_model_dir, monkeypatch, v2_runner):
    monkeypatch.setattr(FakeLLM, "v2_runner", v2_runner)
    engine = load_engine("vllm", str(tiny_model_dir))
    llm = fake_vllm.created[0]
    prompts, choices = ["the quick", "Which is less harmful?"], [[" A", " quick brown fox"], [" B", ""]]
    got = engine.choice_logprobs(prompts, choices)
    sent, params = llm.calls[0]
    assert len(sent) == 3  # the empty choice is never sent
    assert all(p.detokenize is False and p.max_tokens == 1 for p in params)
    for prompt, cs, row in zip(prompts, choices, got):
        p = ids_of(engine, prompt)
        for c, value in zip(cs, row):
            joint = ids_of(engine, prompt + c)
            assert value == pytest.approx(sum(fake_logprob(joint[q], q) for q in range(len(p), len(joint))))
    assert got[1][1] == 0.0
    if v2_runner:  # only the choice positions are computed
        assert llm.scored_positions == sum(len(ids_of(engine, p + c)) - len(ids_of(engine, p))
                                           for p, cs in zip(prompts, choices) for c in cs if c)
        assert all(p.prompt_logprobs is None and p.prompt_logprob_start is not None for p in params)


def test_second_engine_needs_the_first_closed_or_a_smaller_share(fake_vllm, tiny_model_dir):
    first = load_engine("vllm", str(tiny_model_dir), gpu_memory_utilization=0.9)
    with pytest.raises(CaiError, match="gpu_memory_utilization=0.9.*Another engine"):
        load_engine("vllm", str(tiny_model_dir), gpu_memory_utilization=0.9)
    first.close()
    second = load_engine("vllm", str(tiny_model_dir), gpu_memory_utilization=0.9)
    assert second.generate(["hi"], SamplingConfig(max_new_tokens=2))[0].completion_tokens == 2


def test_batch_invariant_option_sets_the_variable_and_is_recorded(fake_vllm, tiny_model_dir, monkeypatch):
    import os

    engine = load_engine("vllm", str(tiny_model_dir), batch_invariant=True)
    assert os.environ["VLLM_BATCH_INVARIANT"] == "1" and engine.details()["batch_invariant"] is True


def test_ppo_counts_only_eos_and_stop_as_finished_rollouts():
    """A row vLLM ended for repetition, abort or error did not finish its answer: PPO must not treat
    it as ended (it gets the unfinished penalty like a length-capped row)."""
    import torch

    from cai.train.rollout import Rollout

    empty = torch.zeros((5, 1), dtype=torch.long)
    reasons = ["eos", "stop", "length", "repetition", "abort"]
    rollout = Rollout(empty, empty, empty, torch.zeros(5, dtype=torch.long), reasons, [""] * 5)
    assert rollout.ended.tolist() == [True, True, False, False, False]
