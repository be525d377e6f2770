"""The one training core of the reward, SFT and PPO trainers: opening a run, the optimizer step,
resume, checkpoints, and the supervised loop (`fit`) that RM and SFT share.

Why it looks like this:
- `open_run` and `Session` are the one setup/resume path: the accelerator, the prepared models,
  AdamW over every trainable module, the schedule, the checkpointer and the metrics log, with the
  state of a checkpoint restored when resuming. PPO opens its session the same way, with the critic
  as a second module.
- `Session.micro_batch` + `Session.optimizer_step` are the one optimizer step: gradients are
  accumulated over micro-batches (DDP all-reduces only on the last one, `no_sync`), each
  micro-batch's loss is checked and divided by their number, the global gradient norm is clipped
  (or only measured) and checked, then the optimizer and the schedule step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from cai.errors import CaiError
from cai.locking import hold_run_dir
from cai.train import fsdp
from cai.train.checkpoint import Checkpointer, TrainState, resume_point
from cai.train.config import TrainConfig
from cai.train.data import BatchStream, seed_everything, total_steps
from cai.train.devices import make_accelerator
from cai.train.metrics import MetricsLogger
from cai.train.models import sparse_tied_embedding_grad
from cai.train.optim import build_optimizer, build_scheduler, check_finite


def open_run(config: TrainConfig, resume: bool) -> tuple[Path, Path | None, Any]:
    """(out_dir, checkpoint to resume from or None, accelerator), with every RNG seeded. A fresh run
    refuses an out_dir that holds checkpoints; --resume refuses one that holds none."""
    out = Path(config.out_dir)
    last = resume_point(out, resume)
    acc = make_accelerator(config)
    if config.lora is not None and fsdp.requested(acc):
        raise CaiError("lora: LoRA runs on one device or data-parallel (DDP) processes, not under FSDP (the adapters "
                       "are small, so each process holds the whole frozen base); launch with examples/accelerate/ddp.yaml")
    seed_everything(config.seed)
    return out, last, acc


class Session:
    """One run's moving parts, set up the same way for every trainer.

    `modules`: the trainable modules, the main model first (it is saved at the top of each
    checkpoint and in final/). Each is prepared for the accelerator; one AdamW covers all of them
    and the schedule runs over `schedule_steps` optimizer steps. Under FSDP cai.train.fsdp shards the
    modules (accelerate's FSDP2 `prepare` wants each model with its optimizer, one model per call)
    and the optimizer is checkpointed with full tensors.
    """

    def __init__(self, config: TrainConfig, acc: Any, out_dir: Path, modules: Mapping[str, torch.nn.Module],
                 tokenizer: Any, schedule_steps: int):
        if acc.is_main_process:  # one trainer per run dir: a second process stops here, before writing
            hold_run_dir(out_dir)
        self.config, self.acc, self.tokenizer = config, acc, tokenizer
        sharded = fsdp.requested(acc)
        prepare = (lambda m: fsdp.shard(m, acc)) if sharded else acc.prepare
        self.modules = {name: prepare(m) for name, m in modules.items()}
        if not sharded:  # after DDP's wrapping, whose reducer then expects the (dense) sum, as it gets
            for module in self.modules.values():
                sparse_tied_embedding_grad(module)
        self.model = next(iter(self.modules.values()))
        optimizer = build_optimizer(torch.nn.ModuleDict(self.modules), config)
        self.optimizer = optimizer if sharded else acc.prepare(optimizer)
        self.scheduler = build_scheduler(self.optimizer, config, schedule_steps)
        self.checkpointer = Checkpointer(out_dir, acc, config.keep_checkpoints)
        optimizer_state = fsdp.FullOptimizerState(self.modules, self.optimizer) if sharded else self.optimizer
        self.stateful: dict[str, Any] = {"optimizer": optimizer_state, "scheduler": self.scheduler}
        self.extra_models: dict[str, torch.nn.Module] = {}
        self.out_dir = out_dir
        self.state = TrainState()
        self.logger: MetricsLogger | None = None

    def resume(self, last: Path | None, total: int) -> TrainState:
        """Restore checkpoint `last` (None: a fresh run) into the models, the stateful objects and the
        RNG, and open the metrics log (dropping rows the interrupted run wrote after `last`)."""
        if last is not None:
            self.state = self.checkpointer.restore(last, self.model, self.stateful, self.extra_models)
            if self.acc.is_main_process:
                print(f"resuming from {last} (step {self.state.step} of {total})")
        self.logger = MetricsLogger(self.out_dir, enabled=self.acc.is_main_process,
                                    resume_step=self.state.step if last else None)
        return self.state

    @contextlib.contextmanager
    def micro_batch(self, k: int, n: int) -> Iterator[None]:
        """Context of micro-batch k of n: DDP all-reduces gradients on the last one only."""
        with contextlib.ExitStack() as stack:
            if k < n - 1:
                for module in self.modules.values():
                    stack.enter_context(self.acc.no_sync(module))
            yield

    def backward(self, loss: torch.Tensor, n: int, where: str) -> None:
        """Backpropagate one of n micro-batches' mean loss (so the step sees the mean over all)."""
        check_finite(loss, "loss", self.state.step, where, self.checkpointer.last)
        self.acc.backward(loss / n)

    def optimizer_step(self, where: str) -> float:
        """Clip (or measure) the global gradient norm, check it, step optimizer and schedule; returns the norm
        (of the whole gradient also when it is sharded)."""
        params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        if self.config.max_grad_norm is not None:
            norm = self.acc.clip_grad_norm_(params, self.config.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad.detach().float() for p in params if p.grad is not None])
        norm = fsdp.full_tensor(norm)
        check_finite(norm, "gradient norm", self.state.step, where, self.checkpointer.last)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self) -> Path:
        """A checkpoint of the current step (every process calls it)."""
        return self.checkpointer.save(self.state, self.model, self.tokenizer, self.stateful, self.extra_models,
                                      config=self.config)

    def log(self, split: str, row: Mapping[str, float], step: int | None = None) -> None:
        assert self.logger is not None, "resume() opens the metrics log"
        self.logger.log(self.state.step if step is None else step, split, row)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()

    def require_finished(self, total: int) -> None:
        """A run stopped early on purpose (tests' stop_after) says how to continue."""
        if self.state.step < total:
            raise CaiError(f"stopped after step {self.state.step} of {total}; rerun with --resume to continue")


# ---------------------------------------------------------------- the supervised loop (RM, SFT)


LossFn = Callable[[torch.nn.Module, list[int]], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[torch.nn.Module], dict[str, float]]


def start_supervised(config: TrainConfig, acc: Any, model: torch.nn.Module, tokenizer: Any, out_dir: Path,
                     last: Path | None, n_rows: int, lengths: list[int] | None = None
                     ) -> tuple[Session, BatchStream, int]:
    """The session of an RM or SFT run over n_rows training rows, its batch stream (`lengths`
    groups similar lengths) and its number of optimizer steps, resumed from `last` if given."""
    stream = BatchStream(n_rows, config.batch_size, config.seed, acc.process_index, acc.num_processes, lengths)
    steps = total_steps(config, stream.per_epoch)
    session = Session(config, acc, out_dir, {"model": model}, tokenizer, steps)
    session.resume(last, steps)
    return session, stream, steps


class _Window:
    """Running means of logged metrics and throughput between two log lines."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counted = 0
        self.start, self.samples = time.perf_counter(), 0

    def add(self, metrics: Mapping[str, float], samples: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.counted += 1
        self.samples += samples

    def means(self, acc: Any) -> dict[str, float]:
        """Means over the window, averaged over processes so the log describes the global batch."""
        keys = sorted(self.sums)
        means = torch.tensor([self.sums[k] / self.counted for k in keys], device=acc.device)
        if acc.num_processes > 1:
            means = acc.reduce(means, reduction="mean")
        return dict(zip(keys, means.tolist()))


def _accumulate(session: Session, stream: BatchStream, loss_fn: LossFn, window: _Window) -> str:
    """Run the grad_accum micro-batches of one optimizer step; returns where they came from."""
    config, state = session.config, session.state
    where = ""
    for micro in range(config.grad_accum):
        rows = stream.batch(state.micro_step)
        epoch, index = stream.position(state.micro_step)
        where = f"epoch {epoch}, batch {index}"
        with session.micro_batch(micro, config.grad_accum):
            loss, metrics = loss_fn(session.model, rows)
            session.backward(loss, config.grad_accum, f"{where}, rows {rows[:8]}")
        state.micro_step += 1
        state.samples += len(rows) * session.acc.num_processes
        window.add({"loss": float(loss.detach()), **metrics}, len(rows) * session.acc.num_processes)
    return where


def fit(session: Session, stream: BatchStream, total: int, loss_fn: LossFn, evaluate: EvalFn | None = None,
        stop_after: int | None = None, progress: bool = True) -> TrainState:
    """Run optimizer steps from session.state to `total`.

    loss_fn(model, row_indices) -> (mean loss of the micro-batch, metrics to average for logging).
    Evaluates every eval_every steps and at the end, checkpoints every save_every steps and at the
    end. `stop_after` ends the call after that many steps in total (tests use it to simulate an
    interruption), without the final eval/save. `progress`: draw the progress bar (main process only).
    """
    from tqdm import tqdm

    config, acc, model, state = session.config, session.acc, session.model, session.state
    model.train()
    window = _Window()
    started = time.perf_counter() - state.elapsed_s
    bar = tqdm(total=total, initial=state.step, desc="train", disable=not (progress and acc.is_main_process),
               dynamic_ncols=True, leave=False)
    while state.step < total and (stop_after is None or state.step < stop_after):
        where = _accumulate(session, stream, loss_fn, window)
        norm = session.optimizer_step(where)
        state.step += 1
        state.elapsed_s = time.perf_counter() - started
        bar.update(1)
        if state.step % config.log_every == 0 or state.step == total:
            now = time.perf_counter()
            row = window.means(acc)
            row.update(grad_norm=norm, lr=session.scheduler.get_last_lr()[0], epoch=state.micro_step / stream.per_epoch,
                       samples_per_s=window.samples / max(now - window.start, 1e-9))
            session.log("train", row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            window = _Window()
        last = state.step == total
        paused = time.perf_counter()
        if evaluate is not None and (last or (config.eval_every and state.step % config.eval_every == 0)):
            model.eval()
            with torch.no_grad():
                session.log("eval", evaluate(model))
            model.train()
        if last or (config.save_every and state.step % config.save_every == 0):
            session.save()
        # evaluation and checkpoint time do not count as training time (elapsed_s, samples_per_s)
        pause = time.perf_counter() - paused
        started += pause
        window.start += pause
    bar.close()
    return state
