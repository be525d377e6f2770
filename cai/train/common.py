"""Training plumbing shared by the reward, SFT and PPO trainers: one place for config, optimizer,
schedule, data order, metrics, checkpoints, resume, the NaN guard and accelerate.

Why it looks like this:
- Data order is a pure function of (seed, epoch), and the data position is one counter of
  micro-batches consumed, so a resumed run draws exactly the batches the uninterrupted run drew.
- Checkpoints are written into a temporary directory and renamed into place: a crash mid-save
  never leaves a half-written checkpoint that `--resume` would pick up. Each one holds the model
  as safetensors + tokenizer + config (loadable with `from_pretrained`) next to the training state
  (optimizer, scheduler, RNG of every process, step and data position).
- A non-finite loss or gradient norm stops the run before the optimizer step, so the weights and
  the last checkpoint stay good, and the error names the step and the batch.
- accelerate drives devices: one process on CPU or one GPU needs no launcher, and the same code
  runs under `accelerate launch` (DDP, FSDP). bf16 is mixed precision (fp32 master weights).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cai.errors import CaiError
from cai.yamlio import data_with_overrides, load_yaml, parse_override, validation_errors

CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.jsonl"
STATE_JSON = "trainer_state.json"
STATE_PT = "training_state.pt"


# ---------------------------------------------------------------- config


class TrainConfig(BaseModel):
    """Fields every trainer shares; trainers subclass it and add their own (data, loss, ...)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="local model dir or hub id in the local cache; None = bundled Gemma 3 270M")
    out_dir: str = Field(description="where metrics, checkpoints/, final/ and summary.json go")
    seed: int = 0
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear warmup (optimizer steps); wins over warmup_ratio")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="warmup as a share of all steps")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine/linear decay floor, as a share of lr")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1, description="rows per micro-batch per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global grad norm; None = off")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="bf16 = mixed precision, fp32 master weights")
    gradient_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = Field(0, ge=0, description="optimizer steps between evaluations; 0 = only at the end")
    save_every: int = Field(0, ge=0, description="optimizer steps between checkpoints; 0 = only at the end")
    log_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept on disk")
    plot: bool = Field(True, description="draw PNG curves at the end")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not 0 < self.adam_betas[0] < 1 or not 0 < self.adam_betas[1] < 1:
            raise ValueError("adam_betas must be in (0, 1)")
        return self

    def model_path(self) -> str:
        """The model to load: `model`, or the bundled default (converted once and cached)."""
        if self.model is not None:
            return self.model
        from cai.default_model import default_model_path

        return str(default_model_path())

    def warmup_for(self, total_steps: int) -> int:
        return self.warmup_steps or round(self.warmup_ratio * total_steps)


def parse_sets(items: Iterable[str] | None) -> dict[str, Any]:
    """`--set key=value` items -> overrides for load_train_config."""
    return dict(parse_override(i) for i in items or [])


def load_train_config(path: str | Path, cls: type[BaseModel], overrides: Mapping[str, Any] | None = None) -> Any:
    """Validate a YAML config (+ dotted overrides) into `cls`. Errors name file:line and the field;
    a bad value that came from an override says so."""
    doc = load_yaml(path)
    data = data_with_overrides(doc, overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        errors = validation_errors(doc, err)
        set_keys = {k.split(".")[0] for k in overrides or {}}
        from_set = [bool(raw["loc"]) and raw["loc"][0] in set_keys for raw in err.errors()]
        if len(errors) == 1 and not from_set[0]:
            raise errors[0] from None
        parts = [
            f"{'--set' if s else f'{e.path}:{e.line}'}: {e.field}: {e.detail}" for e, s in zip(errors, from_set)
        ]
        raise CaiError(f"invalid config {doc.path}: " + "; ".join(parts)) from None


# ---------------------------------------------------------------- seeds, data order, steps


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a permutation that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class BatchStream:
    """Micro-batches of row indices over epochs, addressed by a global micro-batch counter.

    With several processes, each global batch of batch_size * world rows is split by rank (a short
    last batch is topped up with rows from the start of the epoch so every process gets a share).
    With `lengths`, batches are grouped by length: the epoch's permutation is cut into windows of
    `group` global batches, each window is sorted by length and cut into batches, and the batch
    order is shuffled. Rows of similar length then share a batch, so padding to the longest row of
    the batch wastes little compute. Either way the order depends only on (seed, epoch).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 lengths: Sequence[int] | None = None, group: int = 64):
        if n < world:
            raise CaiError(f"{n} training rows for {world} processes: need at least one row per process")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} rows")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.lengths, self.group = lengths, group
        self.per_epoch = math.ceil(n / (batch_size * world))
        self._batches: dict[int, list[list[int]]] = {}

    def position(self, micro_step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of a global micro-batch counter."""
        return divmod(micro_step, self.per_epoch)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches (all processes' rows) of one epoch, in order."""
        if epoch not in self._batches:
            order = epoch_order(self.n, self.seed, epoch)
            span = self.batch_size * self.world
            if self.lengths is None:
                batches = [order[i:i + span] for i in range(0, self.n, span)]
            else:
                window = span * self.group
                batches = []
                for w in range(0, self.n, window):
                    chunk = sorted(order[w:w + window], key=lambda i: -self.lengths[i])
                    batches += [chunk[i:i + span] for i in range(0, len(chunk), span)]
                shuffle = torch.randperm(len(batches), generator=torch.Generator().manual_seed(self.seed + 7919 * (epoch + 1)))
                batches = [batches[i] for i in shuffle.tolist()]
            for b in batches:
                if len(b) % self.world:
                    b += order[: self.world - len(b) % self.world]
            self._batches = {epoch: batches}
        return self._batches[epoch]

    def batch(self, micro_step: int) -> list[int]:
        epoch, index = self.position(micro_step)
        rows = self.epoch_batches(epoch)[index]
        share = len(rows) // self.world
        return rows[self.rank * share:(self.rank + 1) * share]


def total_steps(config: TrainConfig, micro_per_epoch: int) -> int:
    """Optimizer steps of the run: max_steps, else ceil(epochs * micro-batches per epoch / grad_accum)."""
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * micro_per_epoch / config.grad_accum))


# ---------------------------------------------------------------- optimizer, schedule, model prep


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; biases, norms and other 1-D parameters get no weight decay.

    Uses the fused kernel when every parameter is a plain float tensor on CPU or CUDA: one pass
    over each tensor instead of several, and none of the foreach version's temporary copies (on a
    270M model on CPU that is seconds and ~1.5 GB per step). Sharded (FSDP DTensor) parameters
    keep the default implementation.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not hasattr(p, "device_mesh") for p in params
    )
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=config.adam_betas, eps=config.adam_eps,
        **({"fused": True} if fused else {}),
    )


def lr_factor(step: int, total: int, warmup: int, schedule: str, floor: float) -> float:
    """Multiplier of the base lr after `step` optimizer steps: linear warmup, then the schedule."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = config.warmup_for(total)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, config.schedule, config.min_lr_ratio)
    )


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off: RM and PPO losses compare forward passes that must be deterministic."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def prepare_model(model: torch.nn.Module, config: TrainConfig) -> None:
    """Dropout off, KV cache off (training), gradient checkpointing if asked."""
    disable_dropout(model)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def make_accelerator(config: TrainConfig) -> Any:
    """An accelerate.Accelerator for this process: plain CPU when there is no GPU (or device=cpu),
    the launcher's DDP/FSDP setup under `accelerate launch`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    precision = "bf16" if config.dtype == "bf16" else "no"
    cpu = config.device == "cpu" or not torch.cuda.is_available()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise CaiError("device: cuda was asked for but no CUDA GPU is visible; use device: auto or cpu")
    state = AcceleratorState._shared_state
    if state and PartialState().num_processes == 1 and state.get("_mixed_precision") != precision:
        # accelerate keeps one process-wide state; a single-process caller (tests, notebooks)
        # running a second trainer with another precision needs it reset.
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cpu, mixed_precision=precision)


def dist_info(accelerator: Any) -> tuple[int, int]:
    """(rank, world size)."""
    return accelerator.process_index, accelerator.num_processes


# ---------------------------------------------------------------- NaN guard


class NonFiniteError(CaiError):
    """The loss or gradient norm became NaN/inf; raised before the optimizer step."""


def check_finite(value: torch.Tensor | float, what: str, step: int, batch: str, last_checkpoint: Path | None) -> None:
    """Stop the run if `value` is NaN/inf, naming the step, the batch and the checkpoint kept."""
    v = float(value.detach().float().reshape(-1)[0]) if isinstance(value, torch.Tensor) else float(value)
    if math.isfinite(v):
        return
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    raise NonFiniteError(
        f"{what} became {v} at step {step + 1} ({batch}); the update was not applied and {kept}. "
        "Lower lr, use dtype: fp32, or check that batch's rows; rerun with --resume to continue from the checkpoint."
    )


# ---------------------------------------------------------------- metrics


class MetricsLogger:
    """One JSON line per (step, split) record in metrics.jsonl, mirrored to TensorBoard (out_dir/tb).

    On resume, records after the resumed step are dropped (they were written after the checkpoint
    by the interrupted run and will be written again), so the file reads as one clean run.
    Only the main process writes.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.path = Path(out_dir) / METRICS
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=purge)

    def log(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


def plot_curves(metrics_path: str | Path, png_path: str | Path, panels: list[tuple[str, str]]) -> Path | None:
    """One subplot per (split, metric) against step, e.g. [("train", "loss"), ("eval", "accuracy")].
    Panels with no data are skipped; returns None when nothing was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    series = []
    for split, key in panels:
        pts = [(r["step"], r[key]) for r in rows if r["split"] == split and isinstance(r.get(key), (int, float))]
        if pts:
            series.append((split, key, pts))
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.4), squeeze=False)
    for ax, (split, key, pts) in zip(axes[0], series):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(f"{split} {key}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(png_path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------- checkpoints


class TrainState(BaseModel):
    """Where a run is: optimizer steps done and micro-batches consumed (the data position)."""

    model_config = ConfigDict(extra="forbid")

    step: int = 0
    micro_step: int = 0
    samples: int = 0
    elapsed_s: float = 0.0
    extra: dict[str, Any] = Field(default_factory=dict, description="trainer-specific state (e.g. KL controller)")


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_pretrained(accelerator: Any, model: torch.nn.Module, directory: Path, tokenizer: Any = None) -> None:
    """safetensors weights + config (+ tokenizer) that `from_pretrained` loads; gathers sharded
    (FSDP) weights first. Every process must call it; only the main one writes."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load safetensors weights written by save_pretrained into `model` in place. Keys left out
    because they are tied to another parameter (e.g. lm_head = embeddings) are fine; anything
    else missing or unexpected is an error."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    result = model.load_state_dict(state, strict=False)
    loaded_ptrs = {p.data_ptr() for k, p in model.state_dict().items() if k in state}
    params = model.state_dict()
    missing = [k for k in result.missing_keys if params[k].data_ptr() not in loaded_ptrs]
    if missing or result.unexpected_keys:
        raise CaiError(
            f"checkpoint {directory} does not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under out_dir/checkpoints (half-written ones are .tmp-* dirs)."""
    root = Path(out_dir) / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / STATE_JSON).is_file()) if root.is_dir() else []
    return done[-1] if done else None


class Checkpointer:
    """Atomic checkpoints under out_dir/checkpoints/step-XXXXXXXX and exact resume.

    Layout of one checkpoint: the main model's safetensors + config + tokenizer at the top (so the
    directory loads with `from_pretrained` and `cai score`), other models in sub-directories named
    by their key, trainer_state.json (TrainState + the run's config), training_state.pt (optimizer,
    scheduler and other state_dicts) and rng_state_<rank>.pt per process.
    """

    def __init__(self, out_dir: str | Path, accelerator: Any, keep: int = 2):
        self.root = Path(out_dir) / CHECKPOINTS
        self.acc = accelerator
        self.keep = keep
        self.last: Path | None = self.latest()

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root.parent)

    def save(
        self,
        state: TrainState,
        model: torch.nn.Module,
        tokenizer: Any = None,
        stateful: Mapping[str, Any] | None = None,
        extra_models: Mapping[str, torch.nn.Module] | None = None,
        config: BaseModel | None = None,
    ) -> Path:
        """Write a checkpoint of `state.step` (all processes call this). `stateful` objects need
        state_dict(): optimizers, schedulers, controllers."""
        acc = self.acc
        final = self.root / f"step-{state.step:08d}"
        tmp = self.root / f".tmp-step-{state.step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        save_pretrained(acc, model, tmp, tokenizer)
        for name, m in (extra_models or {}).items():
            save_pretrained(acc, m, tmp / name)
        blobs = {k: v.state_dict() for k, v in (stateful or {}).items()}
        if acc.is_main_process:
            torch.save(blobs, tmp / STATE_PT)
            meta = {"state": state.model_dump(), "config": config.model_dump(mode="json") if config else None}
            (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        torch.save(_rng_state(), tmp / f"rng_state_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in sorted(p for p in self.root.glob("step-*") if p != final)[: -self.keep + 1 or None]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self.last = final
        return final

    def restore(
        self,
        path: Path,
        model: torch.nn.Module,
        stateful: Mapping[str, Any] | None = None,
        extra_models: Mapping[str, torch.nn.Module] | None = None,
    ) -> TrainState:
        """Load weights, state_dicts and this process's RNG state from a checkpoint; returns its TrainState."""
        meta = json.loads((path / STATE_JSON).read_text())
        load_weights(self.acc.unwrap_model(model), path)
        for name, m in (extra_models or {}).items():
            load_weights(self.acc.unwrap_model(m), path / name)
        blobs = torch.load(path / STATE_PT, weights_only=False)
        for k, obj in (stateful or {}).items():
            if k not in blobs:
                raise CaiError(f"checkpoint {path} has no saved state for {k!r}")
            obj.load_state_dict(blobs[k])
        rng = path / f"rng_state_{self.acc.process_index}.pt"
        if not rng.exists():
            raise CaiError(f"checkpoint {path} was written by fewer processes than this run has; resume with the same setup")
        _set_rng_state(torch.load(rng, weights_only=False))
        self.last = path
        return TrainState.model_validate(meta["state"])


def resume_point(out_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run). A fresh run refuses to overwrite
    checkpoints of an earlier run in the same out_dir."""
    last = latest_checkpoint(out_dir)
    if resume and last is None:
        raise CaiError(f"--resume: no checkpoint under {Path(out_dir) / CHECKPOINTS}; run without --resume to start")
    if not resume and last is not None:
        raise CaiError(
            f"{out_dir} already holds checkpoints of a run ({last.name}); pass --resume to continue it, "
            "or choose another out_dir"
        )
    return last


def write_json(path: str | Path, obj: BaseModel | Mapping[str, Any]) -> None:
    """Write JSON atomically (tmp file + rename)."""
    p = Path(path)
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else dict(obj)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, p)


# ---------------------------------------------------------------- the supervised loop (RM, SFT)


LossFn = Callable[[torch.nn.Module, list[int]], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[torch.nn.Module], dict[str, float]]


class Loop(BaseModel):
    """What `fit` needs beyond the config; built by `start_loop`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    accelerator: Any
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    stream: Any  # BatchStream
    total_steps: int
    checkpointer: Any  # Checkpointer
    logger: Any  # MetricsLogger
    state: TrainState


def start_loop(config: TrainConfig, acc: Any, model: torch.nn.Module, tokenizer: Any, out_dir: Path,
               last: Path | None, n_rows: int, lengths: list[int] | None = None) -> Loop:
    """The model and optimizer prepared for `acc`, the batch stream over n_rows training rows
    (`lengths` groups similar lengths), the schedule, and the checkpointer and metrics logger, with
    the state restored from checkpoint `last` when resuming."""
    rank, world = dist_info(acc)
    model = acc.prepare(model)
    optimizer = acc.prepare(build_optimizer(model, config))
    stream = BatchStream(n_rows, config.batch_size, config.seed, rank, world, lengths)
    steps = total_steps(config, stream.per_epoch)
    scheduler = build_scheduler(optimizer, config, steps)
    checkpointer = Checkpointer(out_dir, acc, config.keep_checkpoints)
    state = TrainState()
    if last is not None:
        state = checkpointer.restore(last, model, {"optimizer": optimizer, "scheduler": scheduler})
        if acc.is_main_process:
            print(f"resuming from {last} (step {state.step} of {steps})")
    logger = MetricsLogger(out_dir, enabled=acc.is_main_process, resume_step=state.step if last else None)
    return Loop(accelerator=acc, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                stream=stream, total_steps=steps, checkpointer=checkpointer, logger=logger, state=state)


def fit(config: TrainConfig, loop: Loop, loss_fn: LossFn, evaluate: EvalFn | None = None,
        stop_after: int | None = None, progress: bool = True) -> TrainState:
    """Run optimizer steps from loop.state to loop.total_steps.

    loss_fn(model, row_indices) -> (mean loss of the micro-batch, metrics to average for logging).
    Each micro-batch's loss is divided by grad_accum. Evaluates every eval_every steps and at the
    end, checkpoints every save_every steps and at the end. `stop_after` ends the call after that
    many steps in total (tests use it to simulate an interruption), without the final eval/save.
    `progress`: draw the progress bar (main process only).
    """
    from tqdm import tqdm

    acc, model, state = loop.accelerator, loop.model, loop.state
    model.train()
    sums: dict[str, float] = {}
    counted = 0
    started = time.perf_counter() - state.elapsed_s
    window_start, window_samples = time.perf_counter(), 0
    bar = tqdm(total=loop.total_steps, initial=state.step, desc="train", disable=not (progress and acc.is_main_process),
               dynamic_ncols=True, leave=False)
    while state.step < loop.total_steps:
        if stop_after is not None and state.step >= stop_after:
            bar.close()
            return state
        for micro in range(config.grad_accum):
            rows = loop.stream.batch(state.micro_step)
            epoch, index = loop.stream.position(state.micro_step)
            # DDP: all-reduce gradients only on the last micro-batch of the step
            with acc.no_sync(model) if micro < config.grad_accum - 1 else contextlib.nullcontext():
                loss, metrics = loss_fn(model, rows)
                check_finite(loss, "loss", state.step, f"epoch {epoch}, batch {index}, rows {rows[:8]}",
                             loop.checkpointer.last)
                acc.backward(loss / config.grad_accum)
            state.micro_step += 1
            state.samples += len(rows) * acc.num_processes
            window_samples += len(rows) * acc.num_processes
            for k, v in {"loss": float(loss.detach()), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            counted += 1
        params = [p for p in model.parameters() if p.requires_grad]
        if config.max_grad_norm is not None:
            norm = acc.clip_grad_norm_(params, config.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params if p.grad is not None]))
        check_finite(norm, "gradient norm", state.step, f"epoch {epoch}, batch {index}", loop.checkpointer.last)
        loop.optimizer.step()
        loop.scheduler.step()
        loop.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.elapsed_s = time.perf_counter() - started
        bar.update(1)
        if state.step % config.log_every == 0 or state.step == loop.total_steps:
            now = time.perf_counter()
            keys = sorted(sums)
            means = torch.tensor([sums[k] / counted for k in keys], device=acc.device)
            if acc.num_processes > 1:  # average over processes, so the log describes the global batch
                means = acc.reduce(means, reduction="mean")
            row = dict(zip(keys, means.tolist()))
            row.update(grad_norm=float(norm), lr=loop.scheduler.get_last_lr()[0], epoch=state.micro_step / loop.stream.per_epoch,
                       samples_per_s=window_samples / max(now - window_start, 1e-9))
            loop.logger.log(state.step, "train", row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            sums, counted, window_start, window_samples = {}, 0, now, 0
        last = state.step == loop.total_steps
        paused = time.perf_counter()
        if evaluate is not None and (last or (config.eval_every and state.step % config.eval_every == 0)):
            model.eval()
            with torch.no_grad():
                loop.logger.log(state.step, "eval", evaluate(model))
            model.train()
        if last or (config.save_every and state.step % config.save_every == 0):
            loop.checkpointer.save(state, model, loop.tokenizer,
                                   {"optimizer": loop.optimizer, "scheduler": loop.scheduler}, config=config)
        # evaluation and checkpoint time do not count as training time (elapsed_s, samples_per_s)
        pause = time.perf_counter() - paused
        started += pause
        window_start += pause
    bar.close()
    return state
