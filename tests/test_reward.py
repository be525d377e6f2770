"""Reward-model trainer: the loss by hand, truncation, learning a separable set, exact resume, the
NaN guard, `cai score` on a trained checkpoint and config errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cai.cli import main
from cai.errors import CaiError
from cai.train.common import NonFiniteError
from cai.train.reward import (
    PairTokens,
    RewardConfig,
    bt_loss,
    collate_pairs,
    encode_response,
    expected_calibration_error,
    load_reward_model,
    run_reward,
)

GOOD = ["yes", "sure", "safer", "help", "friend", "doctor", "bake", "bread"]
BAD = ["no", "lazy", "dog", "fox", "jumps", "brown", "quick", "over"]
QUESTIONS = ["how do I bake bread?", "which is less harmful?", "can you help me?", "what is the answer?"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---------------------------------------------------------------- loss


def test_bt_loss_equals_hand_computation_soft_hard_margin():
    rc = torch.tensor([1.0, -0.5, 2.0])
    rr = torch.tensor([0.0, 0.5, -1.0])
    p = torch.tensor([1.0, 0.8, 0.3])
    w = torch.tensor([1.0, 2.0, 0.5])
    m = 0.25
    d = [1.0, -1.0, 3.0]
    hand = [-(pi * _logsig(di - m) + (1 - pi) * _logsig(-di - m)) for di, pi in zip(d, [1.0, 0.8, 0.3])]
    loss, per_row = bt_loss(rc, rr, p, margin=m, weights=w)
    assert per_row.tolist() == pytest.approx(hand, rel=1e-6)
    assert float(loss) == pytest.approx((hand[0] * 1 + hand[1] * 2 + hand[2] * 0.5) / 3, rel=1e-6)
    # hard labels, no margin: the plain -log sigmoid(d)
    loss, _ = bt_loss(rc, rr, torch.ones(3))
    assert float(loss) == pytest.approx(sum(-_logsig(x) for x in d) / 3, rel=1e-6)
    # centering adds coef * mean((r_c + r_r)^2)
    centred, _ = bt_loss(rc, rr, torch.ones(3), center_coef=0.01)
    assert float(centred - loss) == pytest.approx(0.01 * (1.0 + 0.0 + 1.0) / 3, rel=1e-6)


def test_bt_loss_soft_label_half_is_symmetric():
    loss_a, _ = bt_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.5]))
    loss_b, _ = bt_loss(torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([0.5]))
    assert float(loss_a) == pytest.approx(float(loss_b))
    assert float(loss_a) == pytest.approx(-0.5 * (_logsig(2.0) + _logsig(-2.0)))


def test_expected_calibration_error_by_hand():
    pred = torch.tensor([0.05, 0.15, 0.95, 0.92])
    target = torch.tensor([0.0, 0.5, 1.0, 0.8])
    # bins: [0.0,0.1): |0.05-0| ; [0.1,0.2): |0.15-0.5| ; [0.9,1.0]: |0.935-0.9|
    hand = 0.25 * 0.05 + 0.25 * 0.35 + 0.5 * abs(0.935 - 0.9)
    assert expected_calibration_error(pred, target) == pytest.approx(hand, rel=1e-5)


# ---------------------------------------------------------------- tokens


def test_truncation_keeps_bos_and_the_final_assistant_turn(tiny_model_dir):
    from tokenizers.processors import TemplateProcessing

    tok, _ = load_reward_model(str(tiny_model_dir))
    context = [{"role": "user", "content": "the quick brown fox " * 40}]
    full, cut = encode_response(tok, context, "sure, ask a doctor", 10_000)
    short, was_cut = encode_response(tok, context, "sure, ask a doctor", 40)
    assert not cut and was_cut
    assert short == full[-40:]  # no BOS in this tokenizer: just the last 40 tokens
    assert short[-1] == tok.eos_token_id
    reply = tok(" sure, ask a doctor", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert short[-len(reply):] == reply
    # a tokenizer that adds BOS (like Gemma's): BOS stays, the prompt loses its beginning
    tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    full, _ = encode_response(tok, context, "sure, ask a doctor", 10_000)
    short, _ = encode_response(tok, context, "sure, ask a doctor", 40)
    assert full[0] == short[0] == tok.bos_token_id
    assert len(short) == 40 and short[1:] == full[-39:]
    # a response longer than the whole budget is cut on the right, its EOS kept
    tiny, _ = encode_response(tok, context, "yes " * 60, 16)
    assert len(tiny) == 16 and tiny[0] == tok.bos_token_id and tiny[-1] == tok.eos_token_id


def test_pairs_share_one_batch_padded_to_the_longest():
    pairs = [PairTokens(chosen=[5, 6, 7], rejected=[5, 8], label_prob=1.0, source="a", truncated=False),
             PairTokens(chosen=[5, 9], rejected=[5, 9, 9, 9, 4], label_prob=0.7, source="b", truncated=False)]
    ids, mask = collate_pairs(pairs, pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7, 0, 0], [5, 9, 0, 0, 0], [5, 8, 0, 0, 0], [5, 9, 9, 9, 4]]
    assert mask.sum(-1).tolist() == [3, 2, 2, 5]


# ---------------------------------------------------------------- training


def _row(rng: random.Random, i: int, source: str) -> dict:
    good = " ".join(rng.choice(GOOD) for _ in range(3))
    bad = " ".join(rng.choice(BAD) for _ in range(3))
    p = 1.0 if source == "human-helpful" else round(rng.uniform(0.7, 0.95), 3)
    return {"id": f"{source}-{i}", "prompt": [{"role": "user", "content": rng.choice(QUESTIONS)}],
            "chosen": [{"role": "assistant", "content": good}], "rejected": [{"role": "assistant", "content": bad}],
            "label_prob": p, "source": source}


def _write_set(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    rows = [_row(rng, i, "ai-harmless" if i % 2 else "human-helpful") for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pairs")
    return _write_set(d / "train.jsonl", 64, 0), _write_set(d / "test.jsonl", 40, 1)


def _config(model: Path, files: tuple[Path, Path], out: Path, **kw) -> RewardConfig:
    base = {
        "model": str(model), "out_dir": str(out), "train_file": str(files[0]), "test_file": str(files[1]),
        "lr": 3e-3, "batch_size": 8, "max_steps": 40, "warmup_steps": 2, "schedule": "linear", "max_length": 64,
        "eval_every": 20, "save_every": 20, "log_every": 5, "device": "cpu", "seed": 3,
    }
    base.update(kw)
    return RewardConfig(**base)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, pair_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm-run")
    summary = run_reward(_config(tiny_model_dir, pair_files, out))
    return out, summary


def test_tiny_model_learns_a_separable_set(trained):
    out, summary = trained
    assert summary.test is not None
    assert summary.test.overall.accuracy >= 0.95
    assert set(summary.test.per_source) == {"ai-harmless", "human-helpful"}
    assert all(m.pairs == 20 and m.accuracy >= 0.9 for m in summary.test.per_source.values())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40]
    assert {"accuracy", "loss", "ece", "reward_std", "ai-harmless/accuracy", "human-helpful/loss"} <= set(evals[-1])
    assert [r["step"] for r in rows if r["split"] == "train"] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert rows[0]["loss"] > [r for r in rows if r["split"] == "train"][-1]["loss"]
    assert (out / "curves.png").stat().st_size > 1000
    assert list((out / "tb").iterdir())
    saved = json.loads((out / "summary.json").read_text())
    assert saved["test"]["overall"]["accuracy"] == summary.test.overall.accuracy
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["cai_reward_std"] == pytest.approx(summary.reward_std)


def test_resume_after_interruption_gives_identical_weights(tiny_model_dir, pair_files, tmp_path):
    kw = {"max_steps": 6, "save_every": 2, "eval_every": 0, "batch_size": 4, "grad_accum": 2, "log_every": 1}
    whole = tmp_path / "whole"
    run_reward(_config(tiny_model_dir, pair_files, whole, **kw))
    part = tmp_path / "part"
    with pytest.raises(CaiError, match="stopped after step 3"):
        run_reward(_config(tiny_model_dir, pair_files, part, **kw), stop_after=3)
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step-00000002"]
    with pytest.raises(CaiError, match="--resume"):
        run_reward(_config(tiny_model_dir, pair_files, part, **kw))  # a fresh run refuses old checkpoints
    run_reward(_config(tiny_model_dir, pair_files, part, **kw), resume=True)
    a = load_file(str(whole / "final" / "model.safetensors"))
    b = load_file(str(part / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in map(json.loads, (part / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the interrupted run's step 3 was dropped and logged again


def test_nan_loss_stops_naming_step_and_batch_keeps_last_checkpoint(tiny_model_dir, pair_files, tmp_path, monkeypatch):
    from cai.train import reward

    calls = {"n": 0}
    real = reward.bt_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, per_row = real(*args, **kwargs)
        return (loss * float("nan"), per_row) if calls["n"] == 4 else (loss, per_row)

    monkeypatch.setattr(reward, "bt_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteError) as err:
        run_reward(_config(tiny_model_dir, pair_files, out, max_steps=6, save_every=2, eval_every=0, batch_size=4))
    msg = str(err.value)
    assert "loss became nan at step 4" in msg
    assert "epoch 0, batch 3" in msg
    assert "step-00000002" in msg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert not (out / "final").exists()


def test_checkpoint_round_trips_through_cai_score(trained, pair_files, tmp_path, capsys):
    out, summary = trained
    scored = tmp_path / "scored.jsonl"
    assert main(["score", str(out), "--file", str(pair_files[1]), "--out", str(scored)]) == 0
    printed = capsys.readouterr().out
    assert f"accuracy {summary.test.overall.accuracy:.4f}" in printed
    rows = [json.loads(x) for x in scored.read_text().splitlines()]
    assert len(rows) == 40 and all("reward_chosen" in r and "reward_rejected" in r for r in rows)
    assert sum(r["correct"] for r in rows) / 40 == pytest.approx(summary.test.overall.accuracy)
    # single texts: the same conversation as messages and as prompt/response scores the same
    texts = tmp_path / "texts.jsonl"
    first = rows[0]
    texts.write_text(
        json.dumps({"messages": first["prompt"] + first["chosen"]}) + "\n"
        + json.dumps({"prompt": first["prompt"][0]["content"], "response": first["chosen"][0]["content"]}) + "\n"
    )
    singles = tmp_path / "singles.jsonl"
    assert main(["score", str(out / "final"), "--file", str(texts), "--out", str(singles)]) == 0
    got = [json.loads(x)["reward"] for x in singles.read_text().splitlines()]
    assert got[0] == pytest.approx(first["reward_chosen"], abs=1e-5)
    assert got[1] == pytest.approx(got[0], abs=1e-6)


def test_bad_config_is_one_paragraph_with_file_and_line(tmp_path, capsys):
    cfg = tmp_path / "rm.yaml"
    cfg.write_text("out_dir: /tmp/x\ntrain_file: t.jsonl\nlr: -1\n")
    assert main(["train", "rm", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cfg}:3: lr: ")
    assert "Traceback" not in err and err.count("\n") == 1
    cfg.write_text("out_dir: /tmp/x\ntrain_file: t.jsonl\nmarginn: 0.5\n")
    assert main(["train", "rm", str(cfg)]) == 1
    assert f"{cfg}:3: marginn: unknown key" in capsys.readouterr().err
    cfg.write_text("out_dir: /tmp/x\ntrain_file: t.jsonl\n")
    assert main(["train", "rm", str(cfg), "--set", "batch_size=0"]) == 1
    assert "--set: batch_size:" in capsys.readouterr().err


def test_cli_trains_with_set_overrides_and_resumes(tiny_model_dir, pair_files, tmp_path, capsys):
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\ntrain_file: {pair_files[0]}\ntest_file: {pair_files[1]}\n"
        f"out_dir: {tmp_path / 'out'}\nmax_steps: 50\nbatch_size: 4\ndevice: cpu\nmax_length: 64\n"
    )
    assert main(["train", "rm", str(cfg), "--set", "max_steps=2", "--set", "source_weights.ai-harmless=2"]) == 0
    printed = capsys.readouterr()
    assert "reward model: 2 steps, 8 pairs seen" in printed.out and "ai-harmless: accuracy" in printed.out
    assert "train: 100%" in printed.err  # the progress bar
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()
    assert main(["train", "rm", str(cfg), "--set", "max_steps=3", "--resume", "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "resuming from" in printed.out and "train:" not in printed.err
    steps = [json.loads(x)["step"] for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 2, 3, 3]  # train + eval rows of steps 2 and 3


def test_a_second_process_cannot_train_into_a_run_dir_in_use(tiny_model_dir, pair_files, tmp_path):
    """Two trainers in one out_dir would interleave checkpoints and metrics: the second stops before writing."""
    import subprocess
    import sys

    from cai.locking import InUseError

    out = tmp_path / "rm-run"
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import sys; from cai.locking import hold_run_dir; hold_run_dir(sys.argv[1]); "
                                "print('held', flush=True); sys.stdin.read()"), str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InUseError, match=f"is already in use by pid {holder.pid}"):
            run_reward(_config(tiny_model_dir, pair_files, out, max_steps=2), progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".cai.lock"]  # nothing of the second run was written
    finally:
        holder.communicate("")
    run_reward(_config(tiny_model_dir, pair_files, out, max_steps=2), progress=False)  # free again once it ended
    assert (out / "final").is_dir()
