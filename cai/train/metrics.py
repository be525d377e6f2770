"""Training metrics: one JSON line per (step, split) in metrics.jsonl (mirrored to TensorBoard),
read back for the summary and drawn as PNG curves."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

METRICS = "metrics.jsonl"


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
        else:
            trim_after(self.path, resume_step)
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


def trim_after(path: Path, step: int) -> None:
    """Drop the lines of a step-keyed JSONL log (metrics, PPO samples) written after `step`: a resumed
    run writes them again, so the file reads as one clean run. A torn last line (the process died
    mid-write) is dropped first, as the data stores do."""
    from cai.store import repair_torn_tail

    if path.exists():
        repair_torn_tail(path)
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


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
