"""PPO (and the reward and SFT trainers, through the same Session) under FSDP2 on two CPU processes
(gloo), launched the way `accelerate launch` would launch them, compared with the same two
processes under DDP: sharding the policy and the critic changes where the tensors live, not the
numbers.

Why DDP and not one process: with two processes each one draws its own half of the step's prompts
and whitens its own advantages, so a one-process run of the same global batch is a different
(equally valid) algorithm; DDP on two processes is the unsharded run of the same one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel
from safetensors.torch import load_file

from cai.train.ppo import PPOConfig
from cai.train.statefile import load_state

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
TIMING = ("time_", "tokens_per_s", "gen_tokens_per_s")
STEPS = 3
# fractions of tokens past a clipping threshold: a token at the threshold may land either side when
# gradients are summed in another order (measured: one token of 256 at step 2); the rest agree to ~5e-5
CLIP_FRACTIONS = ("clipfrac", "value_clipfrac")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: BaseModel, fsdp: bool, *flags: str, world: int = 2, trainer: str = "ppo") -> None:
    """Run tests/dist_worker.py as `world` processes with torchrun's environment."""
    path = Path(config.out_dir).with_suffix(".json")
    path.write_text(config.model_dump_json())
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   ACCELERATE_USE_FSDP="true" if fsdp else "false", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), trainer, str(path), *flags], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    except subprocess.TimeoutExpired:  # e.g. a collective one process never joined: no orphans left behind
        for p in procs:
            p.kill()
        raise
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"


def _config(model: Path, prompts: Path, out: Path, **kw) -> PPOConfig:
    base = {
        "model": str(model), "out_dir": str(out), "prompts": [{"file": str(prompts)}], "device": "cpu", "seed": 0,
        "prompts_per_step": 4, "completions_per_prompt": 2, "max_new_tokens": 8, "lr": 1e-3, "ppo_epochs": 2,
        "batch_size": 4, "grad_accum": 2, "max_steps": STEPS, "unfinished_penalty": 0.0, "critic": "policy_head",
        "kl_coef": 0.2, "sample_every": 0, "warmup_steps": 0, "schedule": "constant", "plot": False, "save_every": 1,
    }
    base.update(kw)
    return PPOConfig(**base)


def _train_rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows if r["split"] == "train"]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "red_team.jsonl"
    questions = ["how do I bake bread?", "which is less harmful?", "can you help me?", "what is the answer?",
                 "count to three", "name a number", "is it safe?", "what time is it?"]
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    return path


@pytest.fixture(scope="module")
def runs(tiny_model_dir, prompts, tmp_path_factory) -> dict[str, Path]:
    """The same two-process run under DDP and under FSDP."""
    root = tmp_path_factory.mktemp("ppo-dist")
    out = {}
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        out[name] = root / name
        launch(_config(tiny_model_dir, prompts, out[name]), fsdp)
    return out


def test_fsdp_matches_ddp_step_by_step_and_in_the_final_weights(runs):
    ddp, fsdp = _train_rows(runs["ddp"]), _train_rows(runs["fsdp"])
    assert [r["step"] for r in fsdp] == list(range(1, STEPS + 1))
    for a, b in zip(ddp, fsdp):
        assert a.keys() == b.keys()
        for key in a:
            tolerance = {"abs": 0.01} if key in CLIP_FRACTIONS else {"rel": 1e-4, "abs": 1e-6}
            assert b[key] == pytest.approx(a[key], **tolerance), (a["step"], key)
    assert fsdp[-1]["kl"] > 1e-3  # the policy moved away from the reference: the comparison is not vacuous
    # the FSDP run was sharded (its optimizer is checkpointed by parameter name), the DDP run was not
    ckpt = Path("checkpoints") / f"step-{STEPS:08d}" / "training_state"
    assert "policy.model.embed_tokens.weight" in load_state(runs["fsdp"] / ckpt)["optimizer"]["state"]
    assert 0 in load_state(runs["ddp"] / ckpt)["optimizer"]["state"]
    a, b = _weights(runs["ddp"] / "final"), _weights(runs["fsdp"] / "final")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
    # final/ is a plain transformers model dir, full shapes
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs["fsdp"] / "final")
    assert model.get_input_embeddings().weight.shape == a["model.embed_tokens.weight"].shape


def test_fsdp_checkpoints_hold_full_tensors(runs, tiny_model_dir):
    """The optimizer and the value head are saved whole (keyed by parameter name), not as shards."""
    ckpt = runs["fsdp"] / "checkpoints" / f"step-{STEPS:08d}"
    blobs = load_state(ckpt / "training_state")
    head = blobs["value_head"]
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(tiny_model_dir).hidden_size
    assert head["weight"].shape == (1, hidden)
    moments = blobs["optimizer"]["state"]
    assert moments["policy.model.embed_tokens.weight"]["exp_avg"].shape == _weights(ckpt)["model.embed_tokens.weight"].shape
    assert moments["value.weight"]["exp_avg_sq"].shape == (1, hidden)


@pytest.mark.slow  # one more two-process launch (~15 s on a 2-core machine)
def test_fsdp_vllm_rollouts_receive_the_full_weights(runs, tiny_model_dir, prompts, tmp_path):
    """rollout_engine vllm under FSDP: each process streams the gathered (full) tensors into its engine
    (a fake that samples from its own full copy of the model, and fails on a shard's shape), so its
    rollouts, and with them the whole run, are those of the hf run that samples from the gathered policy."""
    out = tmp_path / "vllm"
    launch(_config(tiny_model_dir, prompts, out, rollout_engine="vllm", vllm_options={"enforce_eager": True}), True,
           "--fake-vllm")
    for a, b in zip(_train_rows(runs["fsdp"]), _train_rows(out)):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    a, b = _weights(runs["fsdp"] / "final"), _weights(out / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow  # two more two-process launches (~30 s on a 2-core machine)
def test_fsdp_matches_ddp_with_the_reward_model_as_critic(tiny_model_dir, prompts, tmp_path):
    """The critic as a separate sharded model (the reward model read at every token), saved beside the policy."""
    from cai.train.reward import load_reward_model

    torch.manual_seed(0)
    tok, model = load_reward_model(str(tiny_model_dir))
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        launch(_config(tiny_model_dir, prompts, tmp_path / name, critic="reward_model", reward_model=str(tmp_path / "rm"),
                       max_steps=2), fsdp)
    for a, b in zip(_train_rows(tmp_path / "ddp"), _train_rows(tmp_path / "fsdp")):
        for key in a:
            tolerance = {"abs": 0.01} if key in CLIP_FRACTIONS else {"rel": 1e-4, "abs": 1e-6}
            assert b[key] == pytest.approx(a[key], **tolerance), (a["step"], key)
    for sub in ("final", "checkpoints/step-00000002/critic"):
        a, b = _weights(tmp_path / "ddp" / sub), _weights(tmp_path / "fsdp" / sub)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), (sub, key)


@pytest.mark.slow  # two more two-process launches (~30 s on a 2-core machine)
def test_fsdp_resume_reproduces_the_uninterrupted_run(runs, tiny_model_dir, prompts, tmp_path):
    part = tmp_path / "part"
    config = _config(tiny_model_dir, prompts, part)
    launch(config, True, "--stop-after", "1")
    launch(config, True, "--resume")
    whole, resumed = _train_rows(runs["fsdp"]), _train_rows(part)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(whole, resumed):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)
    a, b = _weights(runs["fsdp"] / "final"), _weights(part / "final")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _rm_config(model: Path, tmp_path: Path, out: Path) -> BaseModel:
    from test_reward import _config, _write_set  # the reward tests' preference rows

    data = _write_set(tmp_path / "pairs.jsonl", 32, 0)
    return _config(model, (data, data), out, batch_size=4, max_steps=4, eval_every=2, save_every=2, log_every=1,
                   max_length=48, plot=False)


def _sft_config(model: Path, tmp_path: Path, out: Path) -> BaseModel:
    from test_sft import _sft_config, _sft_file

    return _sft_config(model, _sft_file(tmp_path / "sft.jsonl"), out, max_steps=4, eval_every=2, save_every=2,
                       log_every=1, plot=False)


@pytest.mark.slow  # two two-process launches per trainer (~30 s on a 2-core machine)
@pytest.mark.parametrize("trainer, make_config, first_param", [
    ("rm", _rm_config, "model.score.weight"), ("sft", _sft_config, "model.model.embed_tokens.weight")])
def test_reward_and_sft_trainers_under_fsdp_match_ddp(trainer, make_config, first_param, tiny_model_dir, tmp_path):
    """The reward and SFT trainers share the Session, so they shard the same way: same metrics
    (training and evaluation) and final weights as DDP."""
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        launch(make_config(tiny_model_dir, tmp_path, tmp_path / name), fsdp, trainer=trainer)
    metrics = [[json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("ddp", "fsdp")]
    assert len(metrics[1]) == len(metrics[0]) > 4
    for a, b in zip(*metrics):
        for key, value in a.items():
            if isinstance(value, float) and "per_s" not in key:
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (a["step"], key)
    a, b = _weights(tmp_path / "ddp" / "final"), _weights(tmp_path / "fsdp" / "final")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # sharded: the optimizer is checkpointed by parameter name (DDP: by index)
    state = [load_state(tmp_path / n / "checkpoints" / "step-00000004" / "training_state")["optimizer"]["state"]
             for n in ("ddp", "fsdp")]
    assert 0 in state[0] and first_param in state[1]


def test_fsdp_refuses_the_judge_watch_plainly(tiny_model_dir, prompts, tmp_path):
    """The watch generates on the main process only, which a sharded policy cannot do alone: refused
    before any model loads (a two-process launch of it hung in a collective)."""
    out = tmp_path / "judged"
    with pytest.raises(AssertionError, match="judge_every .the reward-hacking watch. runs on one device or under DDP"):
        launch(_config(tiny_model_dir, prompts, out, judge_every=2, judge_prompts=str(prompts)), True)
