"""PPO trainer on a tiny model: the prompt mix, exact forward passes on padded batches, where
responses end, learning a rule-based reward with bounded KL, exact resume, the reward-model path
through the CLI and config errors."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cai.cli import main
from cai.errors import CaiError, InputError
from cai.train.common import load_train_config
from cai.train.ppo import PPOConfig, run_ppo
from cai.train.ppo_core import response_mask
from cai.train.ppo_models import build_sampler, forward
from cai.train.ppo_prompts import PromptSchedule, apportion, load_prompt_sources
from cai.train.rollout import PolicySampler, VLLMSampler
from cai.train.statefile import load_state

QUESTIONS = ["how do I bake bread?", "which is less harmful?", "can you help me?", "what is the answer?"]
DIGITS = set("0123456789")
TIMING = {"time_generate", "time_score", "time_prepare", "time_update", "tokens_per_s", "gen_tokens_per_s"}


pytestmark = pytest.mark.usefixtures("one_thread")


def digit_reward(convs: list, texts: list[str]) -> list[float]:
    """A rule-based reward: the number of digits in the response."""
    return [float(sum(ch in DIGITS for ch in t)) for t in texts]


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("prompts")
    red = d / "red_team.jsonl"
    red.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    pairs = d / "helpful_pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"prompt": f"helpful question {i}?", "chosen": "a good answer", "rejected": "a bad one"}) + "\n"
        for i in range(3)
    ))
    return red, pairs


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A 'trained' reward model: the tiny LM with a sequence-classification head and stored statistics."""
    from cai.train.reward import load_reward_model

    torch.manual_seed(0)
    tok, model = load_reward_model(str(tiny_model_dir))
    model.config.cai_reward_mean, model.config.cai_reward_std = 0.25, 2.0
    out = tmp_path_factory.mktemp("rm") / "final"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _config(model: Path, red: Path, out: Path, **kw) -> PPOConfig:
    base = {
        "model": str(model), "out_dir": str(out), "prompts": [{"file": str(red)}], "device": "cpu", "seed": 0,
        "prompts_per_step": 8, "completions_per_prompt": 2, "max_new_tokens": 12, "lr": 1e-3, "ppo_epochs": 4,
        "batch_size": 4, "grad_accum": 2, "max_steps": 30, "unfinished_penalty": 0.0, "critic": "policy_head",
        "kl_coef": 0.2, "sample_every": 10, "warmup_steps": 0, "schedule": "constant",
    }
    base.update(kw)
    return PPOConfig(**base)


def _train_rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


# ---------------------------------------------------------------- prompts


def test_prompt_mix_is_apportioned_and_a_pure_function_of_the_step(prompt_files):
    assert apportion(8, [3.0, 1.0]) == [6, 2]
    assert apportion(5, [1.0, 1.0]) == [3, 2]  # the remainder goes to the first source on a tie
    assert apportion(3, [1.0, 1.0, 1.0, 1.0]) == [1, 1, 1, 0]
    red, pairs = prompt_files
    cfg = _config(Path("m"), red, Path("o"), prompts=[{"file": str(red)}, {"file": str(pairs), "kind": "pairs", "weight": 0.5}])
    sources = load_prompt_sources(cfg.prompts)
    assert sources[1][0] == [{"role": "user", "content": "helpful question 0?"}]
    a = PromptSchedule(sources, [1.0, 0.5], 6, seed=3)
    assert a.counts == [4, 2]
    steps = [a.step(s) for s in range(4)]
    assert all([j for j, _ in st] == [0, 0, 0, 0, 1, 1] for st in steps)
    # each epoch of a source visits every prompt once: red-team 4 prompts = one epoch per step
    for st in steps:
        assert sorted(c[0]["content"] for j, c in st if j == 0) == sorted(QUESTIONS)
    pair_prompts = [c[0]["content"] for st in steps[:3] for j, c in st if j == 1]  # 6 draws = 2 epochs of 3
    assert sorted(pair_prompts[:3]) == sorted(pair_prompts[3:]) == [f"helpful question {i}?" for i in range(3)]
    b = PromptSchedule(sources, [1.0, 0.5], 6, seed=3)
    assert b.step(3) == steps[3] and b.step(0) == steps[0]  # any order of calls, same prompts


# ---------------------------------------------------------------- forward passes and rollouts


def test_padded_batch_forward_equals_each_episode_alone(tiny_model_dir):
    """Left-padded queries, right-padded responses, junk after each response's end: the log-probs and
    values of the real tokens equal those of each episode run on its own, unpadded."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    sampler = PolicySampler(model, tok)
    prompts = [tok(q)["input_ids"] for q in ("hi", "how do I bake bread?", "which is less harmful?")]
    batch = sampler.sample(prompts, temperature=1.0, max_new_tokens=6, seeds=[1, 2, 3])
    batch.ended_at = torch.tensor([2, 5, 0])  # pretend rows 0 and 2 ended early: the rest is junk
    rows = torch.arange(3)
    with torch.no_grad():
        lp, ent, v = forward(model, batch, rows, 0.7, torch.device("cpu"), head=head, want_entropy=True)
        mask = response_mask(batch.ended_at, batch.response.shape[1])
        for i, p in enumerate(prompts):
            n = int(batch.ended_at[i]) + 1
            seq = torch.tensor([p + batch.response[i, :n].tolist()])
            out = model(input_ids=seq, output_hidden_states=True)
            logits = out.logits[0, len(p) - 1:-1] / 0.7
            alone = torch.log_softmax(logits, -1).gather(1, seq[0, len(p):, None]).squeeze(1)
            values = head(out.hidden_states[-1][0, len(p) - 1:-1]).squeeze(-1)
            assert torch.allclose(lp[i, :n], alone, atol=1e-5)
            assert torch.allclose(v[i, :n], values, atol=1e-5)
            assert mask[i].sum() == n
        # junk after the end never reaches the real positions
        junk = batch.response.clone()
        junk[0, 3:] = 7
        batch.response = junk
        lp2, _, v2 = forward(model, batch, rows, 0.7, torch.device("cpu"), head=head)
        assert torch.equal(lp2[0, :3], lp[0, :3]) and torch.equal(v2[0, :3], v[0, :3])
    assert ent is not None and bool((ent[mask.bool()] > 0).all())


def test_sampler_cuts_responses_at_end_tokens_and_stop_sequences(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [tok(q)["input_ids"] for q in QUESTIONS] * 2
    seeds = list(range(8))
    plain = PolicySampler(model, tok).sample(prompts, 1.0, 10, seeds)
    # the same seeds give the same responses, whatever else is in the batch
    again = PolicySampler(model, tok).sample(prompts[:3], 1.0, 10, seeds[:3])
    assert again.texts == plain.texts[:3]
    # EOS made likely: rows end on it, the EOS is the last real token, pad follows
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 4.0
    hook = model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        ended = PolicySampler(model, tok).sample(prompts, 1.0, 10, seeds)
    finally:
        hook.remove()
    eos_rows = [i for i, r in enumerate(ended.finish_reasons) if r == "eos"]
    assert eos_rows
    for i in eos_rows:
        end = int(ended.ended_at[i])
        assert ended.response[i, end] == tok.eos_token_id
        assert bool((ended.response[i, end + 1:] == tok.pad_token_id).all())
        assert tok.eos_token not in ended.texts[i]
    assert bool(ended.ended[eos_rows].all())
    # a stop sequence ends the row on the token that completes it; the text leaves it out
    stopped = PolicySampler(model, tok, stop=("e",)).sample(prompts, 1.0, 10, seeds)
    hits = [i for i, r in enumerate(stopped.finish_reasons) if r == "stop"]
    assert hits
    for i in hits:
        end = int(stopped.ended_at[i])
        assert "e" in tok.decode(stopped.response[i, :end + 1]) and "e" not in tok.decode(stopped.response[i, :end])
        assert "e" not in stopped.texts[i]
    assert all(r == "length" for i, r in enumerate(stopped.finish_reasons) if i not in hits and r != "eos")


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def learned(tiny_model_dir, prompt_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo-run")
    return out, run_ppo(_config(tiny_model_dir, prompt_files[0], out), reward_fn=digit_reward)


def test_rule_based_reward_rises_while_kl_stays_bounded(learned):
    out, summary = learned
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # step 1 samples from the reference policy itself
    assert summary.score_start < 1.0
    assert summary.score_end > summary.score_start + 2.0  # from ~0.5 digits per response to several
    assert summary.kl_end < 15.0  # bounded: kl_coef 0.2 prices every nat
    assert max(r["kl"] for r in rows) < 20.0
    expected = {"score", "reward", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "value_loss", "policy_loss",
                "explained_variance", "response_length", "unfinished", "value_clipfrac", "ratio_mean", "grad_norm", "lr"}
    assert expected | TIMING <= set(rows[-1])
    assert rows[-1]["entropy"] < rows[0]["entropy"]
    assert all(0 <= r["clipfrac"] <= 1 and r["approx_kl"] >= 0 for r in rows)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 10, 20, 30] and len(samples) == 16
    assert {"prompt", "response", "score", "finish", "tokens", "kl"} <= set(samples[0])
    assert (out / "curves.png").stat().st_size > 1000
    saved = json.loads((out / "summary.json").read_text())
    assert saved["score_end"] == pytest.approx(summary.score_end)
    assert set(saved["time_share"]) == {"generate", "score", "prepare", "update"}
    AutoModelForCausalLM.from_pretrained(out / "final")  # the policy loads on its own


def test_unfinished_responses_are_penalised(tiny_model_dir, prompt_files, tmp_path):
    out = tmp_path / "pen"
    run_ppo(_config(tiny_model_dir, prompt_files[0], out, max_steps=1, unfinished_penalty=2.0, max_new_tokens=3,
                    sample_every=0, plot=False), reward_fn=lambda c, t: [1.0] * len(t))
    row = _train_rows(out)[0]
    assert row["unfinished"] > 0
    assert row["score"] == 1.0
    assert row["reward"] == pytest.approx(1.0 - 2.0 * row["unfinished"])


def test_a_separate_critic_runs_after_the_policys_backward(tiny_model_dir, prompt_files, tmp_path, monkeypatch):
    """Memory: in the update, the critic's forward pass starts only once the micro-batch's policy
    gradient exists (the policy's activations are freed), never beside the policy's activations."""
    from cai.train import ppo

    policies: list = []
    seen: list[bool] = []
    real_setup, real_values = ppo.setup, ppo.critic_values

    def setup(*args):
        run = real_setup(*args)
        policies.append(run.policy)
        return run

    def critic_values(critic, batch, rows, device):
        if torch.is_grad_enabled():  # the update, not prepare's no-grad pass
            seen.append(all(p.grad is not None for p in policies[0].parameters() if p.requires_grad))
        return real_values(critic, batch, rows, device)

    monkeypatch.setattr(ppo, "setup", setup)
    monkeypatch.setattr(ppo, "critic_values", critic_values)
    run_ppo(_config(tiny_model_dir, prompt_files[0], tmp_path / "run", max_steps=1, ppo_epochs=1, critic="reward_model",
                    critic_model=str(tiny_model_dir), sample_every=0, plot=False), reward_fn=lambda c, t: [1.0] * len(t))
    assert len(seen) == 4 and all(seen)  # 16 episodes in micro-batches of 4


@pytest.mark.parametrize("critic", ["policy_head", "reward_model"])
def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, prompt_files, tmp_path, critic):
    kw = {"max_steps": 4, "save_every": 2, "critic": critic, "critic_model": str(tiny_model_dir), "plot": False,
          "kl_target": 1.0, "kl_horizon": 100, "prompts_per_step": 4, "sample_every": 1, "samples_per_log": 1}
    whole = tmp_path / "whole"
    run_ppo(_config(tiny_model_dir, prompt_files[0], whole, **kw), reward_fn=digit_reward)
    part = tmp_path / "part"
    with pytest.raises(CaiError, match="stopped after step 3"):
        run_ppo(_config(tiny_model_dir, prompt_files[0], part, **kw), reward_fn=digit_reward, stop_after=3)
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step-00000002"]
    with pytest.raises(CaiError, match="--resume"):
        run_ppo(_config(tiny_model_dir, prompt_files[0], part, **kw), reward_fn=digit_reward)
    run_ppo(_config(tiny_model_dir, prompt_files[0], part, **kw), reward_fn=digit_reward, resume=True)
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = "checkpoints/step-00000004"
    if critic == "reward_model":
        ca, cb = (load_file(str(d / ckpt / "critic" / "model.safetensors")) for d in (whole, part))
        assert all(torch.equal(ca[k], cb[k]) for k in ca)
    else:
        ha, hb = (load_state(d / ckpt / "training_state")["value_head"] for d in (whole, part))
        assert all(torch.equal(ha[k], hb[k]) for k in ha)
    ra, rb = _train_rows(whole), _train_rows(part)
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k not in TIMING} == {k: v for k, v in y.items() if k not in TIMING}
    assert ra[-1]["kl_coef"] != 0.2  # the adaptive coefficient moved, and resumed where it was
    sa, sb = ((d / "samples.jsonl").read_text().splitlines() for d in (whole, part))
    assert sa == sb and len(sa) == 4


class ModelBackedLLM:
    """Stands in for vllm.LLM under PPO: samples with PolicySampler from its own copy of the model it
    was built from, takes new weights only through apply_model(model.load_weights), and (like vLLM
    may) leaves the EOS token out of the returned ids."""

    def __init__(self, model: str, **kwargs):
        self.kwargs = kwargs
        self.calls: list[str] = []  # generate / load / sleep / wake, in order
        self.hf = AutoModelForCausalLM.from_pretrained(model).eval()
        self.tok = AutoTokenizer.from_pretrained(model)
        self.loaded: list[set[str]] = []
        self.resets = 0
        self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=1024))

    def get_tokenizer(self):
        return self.tok

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append("generate")
        first = params[0].kwargs
        batch = PolicySampler(self.hf, self.tok, tuple(first["stop"] or ())).sample(
            [p["prompt_token_ids"] for p in prompts], first["temperature"], first["max_tokens"],
            [p.kwargs["seed"] for p in params])
        outputs = []
        for i, reason in enumerate(batch.finish_reasons):
            ids = batch.response[i, :int(batch.ended_at[i]) + 1].tolist()
            done = types.SimpleNamespace(
                text=batch.texts[i], token_ids=ids[:-1] if reason == "eos" else ids,
                finish_reason="length" if reason == "length" else "stop",
                stop_reason="\n\nHuman:" if reason == "stop" else None)
            outputs.append(types.SimpleNamespace(outputs=[done]))
        return outputs

    def apply_model(self, func):
        return [func(self)]  # this object plays vLLM's model, whose load_weights takes (name, tensor) pairs

    def load_weights(self, weights):
        params = dict(self.hf.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)
        self.loaded.append({name for name, _ in weights})
        self.calls.append("load")
        return self.loaded[-1]

    def sleep(self, level=1):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append("wake")

    def reset_prefix_cache(self):
        self.resets += 1


def test_vllm_rollouts_with_weight_sync_reproduce_the_hf_run(tiny_model_dir, prompt_files, tmp_path, monkeypatch):
    """rollout_engine vllm against a model-backed fake vLLM: the same seeds, and weights copied in before each
    rollout, give exactly the hf run; without the sync the rollouts come from stale weights and the runs part."""
    created: list[ModelBackedLLM] = []
    module = types.ModuleType("vllm")
    module.__version__ = "0.33.0"  # the engine refuses versions it does not support
    module.LLM = lambda model, **kw: created.append(ModelBackedLLM(model, **kw)) or created[-1]
    module.SamplingParams = lambda **kw: types.SimpleNamespace(kwargs=kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    kw = {"max_steps": 3, "plot": False, "sample_every": 1, "samples_per_log": 16, "prompts_per_step": 4,
          "completions_per_prompt": 4}
    runs = {}
    for name, extra in [("hf", {}), ("vllm", {"rollout_engine": "vllm", "vllm_options": {"enforce_eager": True}})]:
        runs[name] = tmp_path / name
        run_ppo(_config(tiny_model_dir, prompt_files[0], runs[name], **kw, **extra), reward_fn=digit_reward)
    llm = created[0]
    assert llm.kwargs["gpu_memory_utilization"] == 0.3 and llm.kwargs["enforce_eager"] is True
    assert llm.kwargs["dtype"] == "bfloat16" and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    policy_names = {n for n, _ in AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters()}
    assert llm.loaded == [policy_names] * 3 and llm.resets == 3  # one sync before each step's rollout
    # sleep mode: the KV cache is freed (level 1) during each update and the engine woken before the next sync
    assert llm.kwargs["enable_sleep_mode"] is True
    assert llm.calls == ["load", "generate", "sleep1"] + ["wake", "load", "generate", "sleep1"] * 2
    samples = {k: [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()] for k, d in runs.items()}
    assert samples["vllm"] == samples["hf"] and len(samples["hf"]) == 48
    assert any(s["finish"] == "eos" for s in samples["hf"])  # the EOS vLLM left out was put back
    for a, b in zip(_train_rows(runs["hf"]), _train_rows(runs["vllm"])):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in runs.values())
    assert all(torch.equal(a[k], b[k]) for k in a)

    monkeypatch.setattr(VLLMSampler, "sync", lambda self, policy: None)
    stale = tmp_path / "stale"
    run_ppo(_config(tiny_model_dir, prompt_files[0], stale, **kw, rollout_engine="vllm"), reward_fn=digit_reward)
    got = [json.loads(x) for x in (stale / "samples.jsonl").read_text().splitlines()]
    assert got[:16] == samples["hf"][:16] and got[16:] != samples["hf"][16:]


def test_vllm_rollouts_refuse_tensor_parallel_and_a_grown_vocabulary(tiny_model_dir, prompt_files, tmp_path):
    config = _config(tiny_model_dir, prompt_files[0], tmp_path, rollout_engine="vllm",
                     vllm_options={"tensor_parallel_size": 2})
    with pytest.raises(CaiError, match="tensor_parallel_size must be 1"):
        build_sampler(config, None, None, (), str(tiny_model_dir), world=1, resized_vocab=False)
    with pytest.raises(CaiError, match="no pad token"):
        build_sampler(config.model_copy(update={"vllm_options": {}}), None, None, (), str(tiny_model_dir), world=1,
                      resized_vocab=True)


@pytest.mark.parametrize("user_value", [None, "1"])
def test_vllm_rollout_engine_is_bf16_and_in_process_only_while_it_is_built(
        tiny_model_dir, prompt_files, tmp_path, monkeypatch, user_value):
    """The rollout engine runs in bf16 whatever the trainer's dtype (fp32 attention is slow and doubles
    the KV cache), and VLLM_ENABLE_V1_MULTIPROCESSING is forced to 0 while vLLM starts (the weight sync
    needs the engine core in this process) and given back to the user's value afterwards."""
    seen = {}

    class RecordingLLM:
        llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=1024))

        def __init__(self, model, **kw):
            seen.update(kw, env=os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"))

        def get_tokenizer(self):
            return AutoTokenizer.from_pretrained(tiny_model_dir)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=RecordingLLM, __version__="0.33.0"))
    if user_value is None:
        monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    else:
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", user_value)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = _config(tiny_model_dir, prompt_files[0], tmp_path, rollout_engine="vllm", dtype="fp32")
    build_sampler(config, None, tok, (), str(tiny_model_dir), world=1, resized_vocab=False)
    assert seen["dtype"] == "bfloat16" and seen["env"] == "0"
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == user_value


def test_reward_model_and_critic_from_it_through_the_cli(tiny_model_dir, reward_dir, prompt_files, tmp_path, capsys):
    from cai.train.reward import RewardScorer

    red, pairs = prompt_files
    out = tmp_path / "cli"
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\nreward_model: {reward_dir}\nout_dir: {out}\ndevice: cpu\n"
        f"prompts:\n  - file: {red}\n    weight: 3\n  - file: {pairs}\n    kind: pairs\n"
        "prompts_per_step: 4\nmax_new_tokens: 6\nmax_steps: 2\nbatch_size: 2\ngrad_accum: 1\nppo_epochs: 1\n"
        "sample_every: 1\nsamples_per_log: 4\nplot: false\n"
    )
    assert main(["train", "ppo", str(cfg), "--set", "lr=1e-4"]) == 0
    printed = capsys.readouterr().out
    assert "PPO: 2 steps, 8 episodes" in printed and "score" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompt_mix"] == {"red_team.jsonl": 3, "helpful_pairs.jsonl": 1}
    assert summary["reward"] == str(reward_dir)
    # logged scores are the reward model's normalised scores of the sampled responses
    scorer = RewardScorer(reward_dir, device="cpu", dtype="float32", normalize=True)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    expected = scorer.score_messages([s["prompt"] + [{"role": "assistant", "content": s["response"]}] for s in samples])
    got = [s["score"] for s in samples]
    assert got == pytest.approx(expected, abs=1e-4)
    first = [s for s in samples if s["step"] == 1]
    assert _train_rows(out)[0]["score"] == pytest.approx(sum(s["score"] for s in first) / 4, abs=1e-4)
    critic = load_file(str(out / "checkpoints" / "step-00000002" / "critic" / "model.safetensors"))
    assert "score.weight" in critic  # the critic is a reward model, trained alongside the policy


def test_bad_config_is_one_paragraph_with_file_and_line(tmp_path, prompt_files, capsys):
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(f"out_dir: /tmp/x\nprompts:\n  - file: {prompt_files[0]}\ncliprange: -1\n")
    assert main(["train", "ppo", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cfg}:4: cliprange: ") and "Traceback" not in err and err.count("\n") == 1
    cfg.write_text(f"out_dir: /tmp/x\nprompts:\n  - file: {prompt_files[0]}\n    wieght: 2\n")
    with pytest.raises(InputError, match=r"ppo.yaml:4: prompts.0.wieght: unknown key"):
        load_train_config(cfg, PPOConfig, {})
    cfg.write_text(f"out_dir: /tmp/x\nprompts:\n  - file: {prompt_files[0]}\nprompts_per_step: 3\nbatch_size: 2\n")
    assert main(["train", "ppo", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "must be a multiple of the minibatch" in err and err.count("\n") == 1
    cfg.write_text(f"out_dir: {tmp_path / 'none'}\nprompts:\n  - file: {prompt_files[0]}\ncritic: policy_head\n")
    assert main(["train", "ppo", str(cfg)]) == 1
    assert "reward_model is not set" in capsys.readouterr().err


def test_gradient_checkpointing_changes_memory_not_results(tiny_model_dir, prompt_files, tmp_path):
    """gradient_checkpointing recomputes the policy's and the critic's activations in the backward
    pass instead of keeping them; the updates are the same."""
    kw = {"max_steps": 2, "plot": False, "sample_every": 0, "prompts_per_step": 4, "critic": "reward_model",
          "critic_model": str(tiny_model_dir)}
    runs = {}
    for flag in (False, True):
        runs[flag] = tmp_path / str(flag)
        run_ppo(_config(tiny_model_dir, prompt_files[0], runs[flag], gradient_checkpointing=flag, **kw),
                reward_fn=digit_reward)
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in runs.values())
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], load_file(str(tiny_model_dir / "model.safetensors"))[k]) for k in a)


def test_a_reward_model_with_another_tokenizer_and_chat_format_scores_in_its_own(
        tiny_model_dir, prompt_files, tmp_path):
    """The policy writes HH transcripts with a 256-token vocabulary; the reward model has a 300-token
    vocabulary and a chat template. PPO hands it the decoded conversation, which it renders and
    tokenizes its own way: the logged scores are exactly what it gives that conversation on its own."""
    from tiny import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from cai.train.reward import RewardScorer, load_reward_model

    tok = build_tokenizer(vocab_size=300)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    torch.manual_seed(5)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    rm_tok, rm = load_reward_model(str(tmp_path / "lm"))
    rm.save_pretrained(tmp_path / "rm")
    rm_tok.save_pretrained(tmp_path / "rm")
    policy_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert rm_tok.get_vocab() != policy_tok.get_vocab() and not policy_tok.chat_template

    out = tmp_path / "run"
    run_ppo(_config(tiny_model_dir, prompt_files[0], out, reward_model=str(tmp_path / "rm"), max_steps=1,
                    prompts_per_step=4, sample_every=1, samples_per_log=8, plot=False, normalize_reward=False))
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    scorer = RewardScorer(tmp_path / "rm", device="cpu", dtype="float32")
    expected = scorer.score_messages([s["prompt"] + [{"role": "assistant", "content": s["response"]}] for s in samples])
    assert [s["score"] for s in samples] == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) > 1
    with pytest.raises(CaiError, match="critic with the policy's tokenizer"):
        run_ppo(_config(tiny_model_dir, prompt_files[0], tmp_path / "again", reward_model=str(tmp_path / "rm"),
                        critic="reward_model", max_steps=1))


def test_vllm_rollouts_of_a_lora_policy_receive_merged_weights_under_the_base_names(
        tiny_model_dir, prompt_files, tmp_path, monkeypatch):
    created: list[ModelBackedLLM] = []
    module = types.ModuleType("vllm")
    module.__version__ = "0.33.0"  # the version the vllm engine supports
    module.LLM = lambda model, **kw: created.append(ModelBackedLLM(model, **kw)) or created[-1]
    module.SamplingParams = lambda **kw: types.SimpleNamespace(kwargs=kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    out = tmp_path / "lora-vllm"
    run_ppo(_config(tiny_model_dir, prompt_files[0], out, max_steps=2, plot=False, sample_every=0, prompts_per_step=4,
                    rollout_engine="vllm", lora={"r": 4, "alpha": 8.0}, save_every=1, keep_checkpoints=3),
            reward_fn=digit_reward)
    llm = created[0]
    policy_names = {n for n, _ in AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters()}
    assert llm.loaded == [policy_names] * 2  # plain names: no base_model.model., no lora_A/B, no base_layer
    from peft import PeftModel

    # the second rollout sampled from the policy after step 1: base + that step's adapters, merged
    after_one = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                          out / "checkpoints" / "step-00000001").merge_and_unload()
    served = dict(llm.hf.named_parameters())
    assert all(torch.allclose(p, served[n], atol=1e-6) for n, p in after_one.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not all(torch.equal(p, served[n]) for n, p in base.named_parameters())


# ---------------------------------------------------------------- reward-hacking watch


@pytest.mark.parametrize("lora", [False, True])
def test_judge_watch_logs_a_win_rate_on_judged_steps_against_the_reference(tiny_model_dir, prompt_files, tmp_path,
                                                                           lora):
    """judge_every 2 over 5 steps judges steps 2, 4 and 5 (the last), whatever log_every says. With lr 0
    the policy stays the reference (its own copy, or with LoRA the adapter turned off), so every
    greedy answer equals the reference's and the win rate is exactly 0.5."""
    from test_label import CONSTITUTION

    (tmp_path / "judge.yaml").write_text(CONSTITUTION)
    extra = {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}} if lora else {}
    config = _config(tiny_model_dir, prompt_files[0], tmp_path / "run", max_steps=5, lr=1e-30, log_every=3,
                     prompts_per_step=4, ppo_epochs=1, judge_every=2, judge_prompts=str(prompt_files[1]), judge_limit=2,
                     judge_model=str(tiny_model_dir), judge_constitution=str(tmp_path / "judge.yaml"), **extra)
    summary = run_ppo(config, reward_fn=digit_reward, progress=False)
    rows = _train_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [2, 3, 4, 5]  # 3 by log_every, 2 and 4 by the judge, 5 the last
    assert [r.get("judge_win_rate") for r in rows] == [0.5, None, 0.5, 0.5]
    assert summary.divergence is not None and summary.divergence.points == 3 and not summary.divergence.flagged


def test_judge_watch_needs_held_out_prompts(tiny_model_dir, prompt_files, tmp_path):
    with pytest.raises(ValidationError, match="judge_every needs judge_prompts"):
        _config(tiny_model_dir, prompt_files[0], tmp_path / "run", judge_every=2)
