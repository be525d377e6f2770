"""Shared training plumbing: config loading, schedules, data order, metrics, checkpoints, NaN guard."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from cai.errors import CaiError, InputError
from cai.train.common import (
    BatchStream,
    Checkpointer,
    MetricsLogger,
    NonFiniteError,
    TrainConfig,
    TrainState,
    build_optimizer,
    build_scheduler,
    check_finite,
    epoch_order,
    fit,
    load_train_config,
    make_accelerator,
    parse_sets,
    plot_curves,
    resume_point,
    seed_everything,
    total_steps,
)
from cai.train.loop import Session


def _cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(out_dir=str(tmp_path), device="cpu", **kw)


# ---------------------------------------------------------------- config


def test_config_yaml_with_overrides_and_errors_with_file_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out_dir: runs/x\nlr: 2.0e-5\nschedule: linear\n")
    cfg = load_train_config(path, TrainConfig, parse_sets(["lr=1e-4", "batch_size=4"]))
    assert (cfg.lr, cfg.batch_size, cfg.schedule, cfg.out_dir) == (1e-4, 4, "linear", "runs/x")
    path.write_text("out_dir: runs/x\nlr: 2.0e-5\nschedule: exponential\n")
    with pytest.raises(InputError) as err:
        load_train_config(path, TrainConfig)
    assert str(err.value).startswith(f"{path}:3: schedule: Input should be")
    path.write_text("out_dir: runs/x\nwarmup: 10\nlr: 0\n")
    with pytest.raises(CaiError) as err:  # two errors: one paragraph naming both lines
        load_train_config(path, TrainConfig)
    assert f"{path}:2: warmup: unknown key" in str(err.value) and f"{path}:3: lr:" in str(err.value)
    path.write_text("out_dir: runs/x\n")
    with pytest.raises(CaiError, match="--set: grad_accum:"):
        load_train_config(path, TrainConfig, {"grad_accum": 0})


# ---------------------------------------------------------------- schedule and optimizer


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # warmup 2 of 10 steps: (s+1)/(w+1) during warmup, then the decay over the remaining 8
        ("linear", [1 / 3, 2 / 3, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]),
        ("cosine", [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]),
        ("constant", [1 / 3, 2 / 3] + [1.0] * 8),
    ],
)
def test_lr_schedule_by_hand(tmp_path, schedule, expected):
    cfg = _cfg(tmp_path, lr=0.1, warmup_steps=2, schedule=schedule)
    model = torch.nn.Linear(2, 1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"] / 0.1)
        opt.step()
        sched.step()
    assert seen == pytest.approx(expected)


def test_warmup_ratio_and_total_steps(tmp_path):
    cfg = _cfg(tmp_path, warmup_ratio=0.1, epochs=2.5, grad_accum=3)
    assert cfg.warmup_for(200) == 20
    assert total_steps(cfg, micro_per_epoch=7) == math.ceil(2.5 * 7 / 3)
    assert total_steps(_cfg(tmp_path, max_steps=5), micro_per_epoch=7) == 5


def test_no_weight_decay_on_biases_and_norms(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, _cfg(tmp_path, weight_decay=0.1))
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model[0].weight)] == 0.1
    assert decays[id(model[0].bias)] == decays[id(model[1].weight)] == decays[id(model[1].bias)] == 0.0


# ---------------------------------------------------------------- data order


def test_epoch_order_is_seeded_and_covers_every_row():
    a = epoch_order(50, seed=1, epoch=0)
    assert sorted(a) == list(range(50))
    assert a == epoch_order(50, seed=1, epoch=0)
    assert a != epoch_order(50, seed=1, epoch=1) and a != epoch_order(50, seed=2, epoch=0)


def test_batch_stream_positions_and_ranks():
    s = BatchStream(10, batch_size=4, seed=0)
    assert s.per_epoch == 3
    epoch0 = s.batch(0) + s.batch(1) + s.batch(2)
    assert sorted(epoch0) == list(range(10)) and len(s.batch(2)) == 2
    assert s.position(4) == (1, 1)
    assert s.batch(3) + s.batch(4) + s.batch(5) == epoch_order(10, 0, 1)
    ranks = [BatchStream(10, batch_size=2, seed=0, rank=r, world=2) for r in range(2)]
    assert ranks[0].per_epoch == 3
    shards = [r.batch(0) for r in ranks]
    assert shards[0] + shards[1] == epoch_order(10, 0, 0)[:4]
    with pytest.raises(CaiError):
        BatchStream(1, batch_size=2, seed=0, world=2)
    short = [BatchStream(5, batch_size=2, seed=0, rank=r, world=2) for r in range(2)]
    last = [s.batch(1) for s in short]  # one row left: topped up from the epoch start, one row each
    assert [len(x) for x in last] == [1, 1] and last[1] == epoch_order(5, 0, 0)[:1]


def test_length_grouped_batches_cover_the_epoch_and_cut_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(200)]
    grouped = BatchStream(200, batch_size=8, seed=1, lengths=lengths, group=5)
    plain = BatchStream(200, batch_size=8, seed=1)
    for epoch in (0, 1):
        batches = [grouped.batch(epoch * 25 + i) for i in range(25)]
        assert sorted(i for b in batches for i in b) == list(range(200))
        assert all(lengths[b[0]] == max(lengths[i] for i in b) for b in batches)  # sorted inside a batch

    def padded(stream):
        return sum(len(b) * max(lengths[i] for i in b) for b in map(stream.batch, range(25)))

    assert padded(grouped) < 0.75 * padded(plain)
    again = BatchStream(200, batch_size=8, seed=1, lengths=lengths, group=5)
    assert [again.batch(i) for i in range(30)] == [grouped.batch(i) for i in range(30)]


# ---------------------------------------------------------------- metrics


def test_metrics_jsonl_resume_drops_later_rows_and_plots(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        log.log(step, "train", {"loss": 1.0 / step, "tensor": torch.tensor(2.0)})
    log.log(3, "eval", {"accuracy": 0.5})
    log.close()
    resumed = MetricsLogger(tmp_path, resume_step=2, tensorboard=False)
    resumed.log(3, "train", {"loss": 0.25})
    resumed.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"], r["loss"]) for r in rows] == [(1, "train", 1.0), (2, "train", 0.5), (3, "train", 0.25)]
    assert rows[0]["tensor"] == 2.0
    png = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "c.png", [("train", "loss"), ("eval", "accuracy")])
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves(tmp_path / "metrics.jsonl", tmp_path / "none.png", [("eval", "nothing")]) is None


def test_a_torn_last_metrics_line_is_repaired_on_resume(tmp_path):
    """Power loss mid-write leaves half a JSON line; resuming drops it like the data stores do."""
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2):
        log.log(step, "train", {"loss": 1.0 / step})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "split": "tra')
    resumed = MetricsLogger(tmp_path, resume_step=2, tensorboard=False)
    resumed.log(3, "train", {"loss": 0.25})
    resumed.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_tensorboard_events_written(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log(1, "train", {"loss": 0.5})
    log.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


# ---------------------------------------------------------------- NaN guard


def test_check_finite_names_step_batch_and_checkpoint(tmp_path):
    check_finite(torch.tensor(1.5), "loss", 0, "batch 0", None)
    with pytest.raises(NonFiniteError) as err:
        check_finite(torch.tensor(float("inf")), "gradient norm", 6, "epoch 1, batch 2", tmp_path / "step-6")
    msg = str(err.value)
    assert "gradient norm became inf at step 7 (epoch 1, batch 2)" in msg and "step-6" in msg
    with pytest.raises(NonFiniteError, match="no checkpoint was written yet"):
        check_finite(float("nan"), "loss", 0, "batch 0", None)


# ---------------------------------------------------------------- checkpoints and the loop


class _Net(torch.nn.Module):
    """A module with the save_pretrained/config surface checkpoints need, tied weights included."""

    def __init__(self):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig()
        self.emb = torch.nn.Embedding(5, 3)
        self.out = torch.nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.emb(x)).mean(-1)

    def save_pretrained(self, directory, state_dict=None, safe_serialization=True):
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        sd = {k: v.contiguous() for k, v in (state_dict or self.state_dict()).items() if k != "out.weight"}
        save_file(sd, str(directory / "model.safetensors"))
        self.config.save_pretrained(directory)


def test_checkpoint_atomic_prune_and_restore_rng(tmp_path):
    acc = make_accelerator(_cfg(tmp_path))
    net = _Net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    ck = Checkpointer(tmp_path, acc, keep=2)
    (tmp_path / "checkpoints" / ".tmp-step-00000009").mkdir(parents=True)  # a crashed save: ignored
    for step in (1, 2, 3):
        net(torch.tensor([1, 2])).sum().backward()
        opt.step()
        ck.save(TrainState(step=step, micro_step=step * 2), net, stateful={"optimizer": opt})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith("."))
    assert names == ["step-00000002", "step-00000003"]
    assert ck.latest().name == "step-00000003"
    seed_everything(7)
    ck.save(TrainState(step=4, micro_step=8), net, stateful={"optimizer": opt})
    after = (torch.rand(3), random.random(), np.random.rand())
    weights = net.emb.weight.detach().clone()
    with torch.no_grad():
        net.emb.weight.zero_()
    opt2 = torch.optim.AdamW(net.parameters(), lr=0.1)
    state = ck.restore(ck.latest(), net, {"optimizer": opt2})
    assert (state.step, state.micro_step) == (4, 8)
    assert torch.equal(net.emb.weight, weights) and net.out.weight is net.emb.weight
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(after[0], again[0]) and after[1:] == again[1:]


class _Planted:
    """Unpickling this object runs open(marker, "w"): what a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _saved_checkpoint(tmp_path):
    acc = make_accelerator(_cfg(tmp_path))
    net = _Net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.tensor([1, 2])).sum().backward()
    opt.step()
    ck = Checkpointer(tmp_path, acc)
    return ck, ck.save(TrainState(step=1, micro_step=1), net, stateful={"optimizer": opt}), net, opt


def test_checkpoints_hold_no_pickle(tmp_path):
    """Training state is safetensors + JSON: nothing in a checkpoint is unpickled on resume."""
    _, path, _, _ = _saved_checkpoint(tmp_path)
    assert not list(path.glob("*.pt")) and not list(path.glob("*.bin"))
    assert (path / "training_state.safetensors").is_file() and (path / "rng_state_0.safetensors").is_file()
    json.loads((path / "training_state.json").read_text())


@pytest.mark.parametrize("planted", ["training_state.pt", "rng_state_0.pt"])
def test_a_planted_pickle_in_a_checkpoint_is_refused_and_never_run(tmp_path, planted):
    ck, path, net, opt = _saved_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    stem = planted.removesuffix(".pt")
    for old in path.glob(f"{stem}.*"):
        old.unlink()  # an old-style (or crafted) checkpoint: the pickle file in place of the safe pair
    torch.save({"optimizer": _Planted(marker)} if stem == "training_state" else _Planted(marker), path / planted)
    with pytest.raises(CaiError, match="pickle") as err:
        ck.restore(path, net, {"optimizer": opt})
    assert not marker.exists()
    assert str(path) in str(err.value)


def test_resume_point_guards(tmp_path):
    assert resume_point(tmp_path, resume=False) is None
    with pytest.raises(CaiError, match="no checkpoint"):
        resume_point(tmp_path, resume=True)
    (tmp_path / "checkpoints" / "step-00000003").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000003" / "trainer_state.json").write_text("{}")
    assert resume_point(tmp_path, resume=True).name == "step-00000003"
    with pytest.raises(CaiError, match="pass --resume"):
        resume_point(tmp_path, resume=False)


def _run_loop(tmp_path, cfg, stop_after=None, resume=False):
    seed_everything(cfg.seed)
    acc = make_accelerator(cfg)
    net = _Net()
    data = torch.randint(0, 5, (12, 2))
    target = torch.randn(12, 2)
    stream = BatchStream(12, cfg.batch_size, cfg.seed)
    steps = total_steps(cfg, stream.per_epoch)
    session = Session(cfg, acc, cfg.out_dir, {"model": net}, None, steps)
    state = session.resume(resume_point(cfg.out_dir, resume), steps)

    def loss_fn(model, rows):
        noise = torch.randn(len(rows), 2) * 0.01  # consumes RNG: resume must restore it
        return ((model(data[rows]) - target[rows] - noise) ** 2).mean(), {"rows": len(rows)}

    fit(session, stream, steps, loss_fn, evaluate=lambda m: {"probe": float(m.emb.weight.sum())}, stop_after=stop_after)
    session.close()
    return net.emb.weight.detach().clone(), state


def test_fit_resume_matches_uninterrupted_run(tmp_path):
    kw = {"lr": 0.05, "batch_size": 5, "grad_accum": 2, "epochs": 4, "save_every": 2, "log_every": 1, "seed": 3}
    whole, state = _run_loop(tmp_path, _cfg(tmp_path / "a", **kw))
    assert state.step == 6 and state.micro_step == 12  # 3 micro-batches per epoch * 4 epochs / 2
    _run_loop(tmp_path, _cfg(tmp_path / "b", **kw), stop_after=3)
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "spl')  # the interrupted run died mid-line
    resumed, _ = _run_loop(tmp_path, _cfg(tmp_path / "b", **kw), resume=True)
    assert torch.equal(whole, resumed)
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [6]
    assert rows[0]["samples_per_s"] > 0 and rows[0]["rows"] == 5 and "grad_norm" in rows[0]


def _tiny_lm(tie: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie))


def _two_micro_batch_grads(model: torch.nn.Module) -> torch.Tensor:
    """The embedding weight's gradient after two accumulated backward passes (repeated tokens in each)."""
    for ids in (torch.tensor([[1, 2, 2, 7, 1]]), torch.tensor([[7, 7, 3, 4, 9]])):
        model(input_ids=ids, labels=ids).loss.backward()
    return model.get_input_embeddings().weight.grad


def test_a_tied_embedding_gets_sparse_rows_summed_into_a_dense_gradient():
    from cai.train.models import sparse_tied_embedding_grad

    dense, sparse = _tiny_lm(tie=True), _tiny_lm(tie=True)
    assert sparse_tied_embedding_grad(sparse) and sparse.get_input_embeddings().sparse
    want, got = _two_micro_batch_grads(dense), _two_micro_batch_grads(sparse)
    assert not got.is_sparse  # AdamW (fused) takes it as it is
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)  # the same sum, added in another order
    untied = _tiny_lm(tie=False)
    assert not sparse_tied_embedding_grad(untied) and not untied.get_input_embeddings().sparse
    frozen = _tiny_lm(tie=True)
    frozen.get_input_embeddings().weight.requires_grad_(False)  # LoRA: the base is frozen
    assert not sparse_tied_embedding_grad(frozen)
