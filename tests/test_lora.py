"""LoRA (peft) in the three trainers on a tiny model: only adapters (and heads) train, checkpoints hold
adapters and resume exactly, final/ is a merged model plain transformers loads, a LoRA reward model
keeps its trained head, and PPO's reference is the policy with its adapter off, exactly."""

from __future__ import annotations

import json
import random
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cai.errors import CaiError
from cai.train.config import LoraSettings
from cai.train.lora import add_lora, merged_weights
from cai.train.ppo import PPOConfig, reference_logprobs, run_ppo
from cai.train.ppo_models import forward
from cai.train.reward import RewardConfig, RewardScorer, run_reward
from cai.train.rollout import PolicySampler
from cai.train.sft import SFTConfig, run_sft

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = {"r": 4, "alpha": 8.0}
QUESTIONS = ["how do I bake bread?", "which is less harmful?", "can you help me?", "what is the answer?"]


def _sft_data(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": QUESTIONS[i % 4], "completion": "Mix flour, water and salt."}) + "\n"
                            for i in range(16)))
    return path


def _pairs(path: Path) -> Path:
    rng = random.Random(0)
    path.write_text("".join(json.dumps({
        "id": f"p{i}", "prompt": [{"role": "user", "content": rng.choice(QUESTIONS)}],
        "chosen": [{"role": "assistant", "content": "bake bread safer doctor"}],
        "rejected": [{"role": "assistant", "content": "lazy dog fox jumps"}], "label_prob": 1.0, "source": "human"})
        + "\n" for i in range(16)))
    return path


def _logits(model, tok, text="Human: how do I bake bread?\n\nAssistant:"):
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_sft_lora_trains_adapters_only_resumes_exactly_and_exports_a_merged_model(tiny_model_dir, tmp_path):
    data = _sft_data(tmp_path / "sft.jsonl")
    kw = {"model": str(tiny_model_dir), "train_file": str(data), "device": "cpu", "lr": 1e-2, "max_steps": 4,
          "batch_size": 4, "save_every": 2, "log_every": 1, "plot": False, "lora": LORA}
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_sft(SFTConfig(out_dir=str(whole), **kw))
    with pytest.raises(CaiError, match="stopped after step 3"):
        run_sft(SFTConfig(out_dir=str(part), **kw), stop_after=3)
    run_sft(SFTConfig(out_dir=str(part), **kw), resume=True)
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    ckpt = whole / "checkpoints" / "step-00000004"
    adapters = load_file(str(ckpt / "adapter_model.safetensors"))
    assert adapters and all("lora_" in k for k in adapters) and not (ckpt / "model.safetensors").exists()
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert torch.equal(a["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])

    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(whole / "final")
    merged = AutoModelForCausalLM.from_pretrained(whole / "final")  # plain transformers, no peft
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ckpt)
    assert torch.allclose(_logits(merged, tok), _logits(adapted, tok), atol=1e-5)


def test_lora_reward_model_keeps_its_trained_head(tiny_model_dir, tmp_path):
    pairs = _pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "rm"
    run_reward(RewardConfig(model=str(tiny_model_dir), out_dir=str(out), train_file=str(pairs), device="cpu",
                            lr=1e-2, max_steps=4, batch_size=4, max_length=48, plot=False, lora=LORA))
    ckpt = out / "checkpoints" / "step-00000004"
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert any("score" in k for k in saved)  # the head is saved with the adapters
    from cai.train.reward import load_reward_model

    torch.manual_seed(0)
    _, fresh = load_reward_model(str(tiny_model_dir))
    final = load_file(str(out / "final" / "model.safetensors"))
    assert not torch.equal(final["score.weight"], fresh.score.weight)  # trained, not a re-initialised head

    from cai.train.checkpoint import load_weights

    _, rebuilt = load_reward_model(str(tiny_model_dir))
    rebuilt = add_lora(rebuilt, LoraSettings(**LORA), full=("score",))
    load_weights(rebuilt, ckpt)
    texts = ["Human: how do I bake bread?\n\nAssistant: bake bread safer", "Human: hi\n\nAssistant: lazy dog"]
    scorer = RewardScorer(out / "final", device="cpu", dtype="float32")
    tok = scorer.tokenizer
    with torch.no_grad():
        again = [float(rebuilt.eval()(input_ids=torch.tensor([tok(t)["input_ids"] + [tok.eos_token_id]])).logits)
                 for t in texts]
    assert scorer.score(texts) == pytest.approx(again, abs=1e-5)


@pytest.mark.parametrize("trainer", ["sft", "rm"])
def test_sft_and_rm_lora_on_a_bf16_base(tiny_model_dir, tmp_path, monkeypatch, trainer):
    """What a GPU run does (the frozen base in bf16, adapters and the reward head in fp32), forced on
    CPU: the dtypes meet without errors, the loss falls, and final/ is the merged bf16 model."""
    from cai.train import models

    monkeypatch.setattr(models, "frozen_dtype", lambda device: "bfloat16")
    out = tmp_path / trainer
    kw = {"model": str(tiny_model_dir), "out_dir": str(out), "device": "cpu", "lr": 3e-2, "max_steps": 6,
          "batch_size": 4, "log_every": 1, "plot": False, "lora": LORA, "save_every": 6}
    if trainer == "sft":
        run_sft(SFTConfig(train_file=str(_sft_data(tmp_path / "d.jsonl")), **kw))
    else:
        run_reward(RewardConfig(train_file=str(_pairs(tmp_path / "d.jsonl")), max_length=48, **kw))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert rows[-1]["loss"] < rows[0]["loss"]
    saved = load_file(str(out / "checkpoints" / "step-00000006" / "adapter_model.safetensors"))
    assert saved and all(t.dtype == torch.float32 for t in saved.values())  # adapters (and the head) in fp32
    final = load_file(str(out / "final" / "model.safetensors"))
    assert final["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    if trainer == "rm":
        assert any("score" in k for k in saved)


def test_reference_is_the_policy_with_its_adapter_off_exactly(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSettings(**LORA)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter
    prompts = [tok(f"Human: {q}\n\nAssistant:")["input_ids"] for q in QUESTIONS]
    batch = PolicySampler(policy, tok).sample(prompts, 1.0, 6, [1, 2, 3, 4])
    run = types.SimpleNamespace(ref=None, policy=policy, config=types.SimpleNamespace(temperature=0.7),
                                device=torch.device("cpu"))
    rows = torch.arange(4)
    with torch.no_grad():
        ref = reference_logprobs(run, batch, rows)
        plain = forward(base, batch, rows, 0.7, torch.device("cpu"))[0]
        adapted = forward(policy, batch, rows, 0.7, torch.device("cpu"))[0]
    assert torch.equal(ref, plain)
    assert not torch.allclose(adapted, plain)

    names = dict(merged_weights(policy))
    assert names.keys() == {n for n, _ in base.named_parameters()}  # vLLM's names
    exported = policy.merge_and_unload()
    assert all(torch.allclose(names[n], p, atol=1e-6) for n, p in exported.named_parameters())


def test_ppo_with_lora_policy_and_critic_resumes_exactly_with_no_reference_copy(
        tiny_model_dir, tmp_path, monkeypatch):
    from cai.engines import hf

    loads = []
    real = hf.load_pretrained
    monkeypatch.setattr(hf, "load_pretrained", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    prompts = tmp_path / "red.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    kw = {"model": str(tiny_model_dir), "prompts": [{"file": str(prompts)}], "device": "cpu", "prompts_per_step": 4,
          "max_new_tokens": 6, "lr": 1e-2, "ppo_epochs": 1, "batch_size": 2, "grad_accum": 2, "max_steps": 3,
          "critic": "reward_model", "critic_model": str(tiny_model_dir), "save_every": 1, "sample_every": 0,
          "plot": False, "lora": LORA}
    digits = lambda convs, texts: [float(sum(c.isdigit() or c == " " for c in t)) for t in texts]
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_ppo(PPOConfig(out_dir=str(whole), **kw), reward_fn=digits)
    assert loads == [str(tiny_model_dir)]  # the policy only: the reference is its adapter turned off
    with pytest.raises(CaiError, match="stopped after step 2"):
        run_ppo(PPOConfig(out_dir=str(part), **kw), reward_fn=digits, stop_after=2)
    run_ppo(PPOConfig(out_dir=str(part), **kw), reward_fn=digits, resume=True)
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (whole, part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = "checkpoints/step-00000003/critic/adapter_model.safetensors"
    ca, cb = (load_file(str(d / ckpt)) for d in (whole, part))
    assert any("score" in k for k in ca) and all(torch.equal(ca[k], cb[k]) for k in ca)
    rows = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == 0.0  # step 1: the adapter starts at zero, so policy == reference exactly
    AutoModelForCausalLM.from_pretrained(whole / "final")


@pytest.mark.parametrize(("critic", "lora"), [("reward_model", LORA), ("policy_head", LORA), ("reward_model", None)])
def test_ppo_on_bf16_frozen_models_with_an_fp32_trainer(tiny_model_dir, tmp_path, monkeypatch, critic, lora):
    """What a GPU run does (frozen models and bases in bf16, trained weights and heads in fp32, trainer
    dtype fp32), forced on CPU: the dtypes meet without errors and the trained parts learn."""
    from cai.train import models, ppo, ppo_models

    for module in (models, ppo, ppo_models):
        monkeypatch.setattr(module, "frozen_dtype", lambda device: "bfloat16")
    prompts = tmp_path / "red.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    out = tmp_path / "run"
    run_ppo(PPOConfig(model=str(tiny_model_dir), out_dir=str(out), prompts=[{"file": str(prompts)}], device="cpu",
                      prompts_per_step=4, max_new_tokens=6, lr=1e-2, ppo_epochs=1, batch_size=2, grad_accum=2,
                      max_steps=2, critic=critic, critic_model=str(tiny_model_dir), sample_every=0, plot=False,
                      dtype="fp32", lora=lora),
            reward_fn=lambda convs, texts: [float(len(t)) for t in texts])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in rows)
    if lora is None:  # an fp32 policy against its bf16 reference copy: the KL starts near 0, not at 0
        assert abs(rows[0]["kl"]) < 0.05
        return
    assert rows[0]["kl"] == 0.0
    adapters = load_file(str(out / "checkpoints" / "step-00000002" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in adapters.values())
    final = load_file(str(out / "final" / "model.safetensors"))
    assert final["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("frozen", ["float32", "bfloat16"])
def test_a_lora_critic_from_the_reward_model_scores_as_the_reward_model_with_one_copy(
        tiny_model_dir, tmp_path, monkeypatch, frozen):
    """A full fine-tune of the policy with critic_lora: the reward model is loaded once (as the critic's
    base) and scores with the critic's adapters off and its original head, as a copy of its own would;
    bf16 (a GPU's frozen dtype) puts the fp32 head over a bf16 base in the reward model's own forward."""
    from cai.train import models, ppo, ppo_models, reward

    rm = tmp_path / "rm"
    run_reward(RewardConfig(model=str(tiny_model_dir), out_dir=str(rm), train_file=str(_pairs(tmp_path / "p.jsonl")),
                            device="cpu", lr=1e-2, max_steps=2, batch_size=4, max_length=48, plot=False))
    for module in (models, ppo, ppo_models):
        monkeypatch.setattr(module, "frozen_dtype", lambda device: frozen)
    loads = []
    real = reward.load_reward_model
    monkeypatch.setattr(reward, "load_reward_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    prompts = tmp_path / "red.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    out = tmp_path / "run"
    run_ppo(PPOConfig(model=str(tiny_model_dir), out_dir=str(out), prompts=[{"file": str(prompts)}], device="cpu",
                      reward_model=str(rm / "final"), critic_lora=LORA, prompts_per_step=4, max_new_tokens=6, lr=1e-2,
                      ppo_epochs=2, batch_size=2, grad_accum=2, max_steps=3, sample_every=1, samples_per_log=4,
                      plot=False, normalize_reward=False))
    assert loads == [str(rm / "final")]  # the critic; no second copy for scoring
    critic = load_file(str(out / "checkpoints" / "step-00000003" / "critic" / "adapter_model.safetensors"))
    head = next(v for k, v in critic.items() if "score" in k)
    trained_rm = load_file(str(rm / "final" / "model.safetensors"))
    assert not torch.allclose(head.float(), trained_rm["score.weight"].float())  # the critic's head moved
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines() if json.loads(x)["step"] == 3]
    own = RewardScorer(rm / "final", device="cpu", dtype=frozen)
    want = own.score_messages([r["prompt"] + [{"role": "assistant", "content": r["response"]}] for r in rows])
    tolerance = 1e-6 if frozen == "float32" else 0.05  # bf16: our fp32 head against the copy's bf16 head
    assert [r["score"] for r in rows] == pytest.approx(want, abs=tolerance)
    policy = load_file(str(out / "final" / "model.safetensors"))
    assert policy["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32  # the policy trained in full


def test_lora_under_fsdp_is_refused_plainly(tmp_path, monkeypatch):
    from cai.train import loop

    monkeypatch.setattr(loop, "make_accelerator",
                        lambda config: types.SimpleNamespace(distributed_type=types.SimpleNamespace(value="FSDP")))
    with pytest.raises(CaiError, match="not under FSDP"):
        loop.open_run(SFTConfig(out_dir=str(tmp_path), train_file="t.jsonl", lora=LORA), resume=False)
