"""The training core's public names in one import, for code outside cai/train (the report, the
pipeline, benchmarks, tests). Each lives in the module that owns its job:

- config.py      TrainConfig and loading a trainer's YAML with overrides
- data.py        seeds, the row order of each epoch, micro-batches (BatchStream)
- optim.py       AdamW, the schedule, the NaN guard
- models.py      dropout off, KV cache off, gradient checkpointing
- devices.py     the accelerator (one device, DDP, FSDP)
- fsdp.py        FSDP2 sharding, gathering for generation, full state dicts for checkpoints
- metrics.py     metrics.jsonl, TensorBoard, curves
- checkpoint.py  atomic checkpoints and exact resume
- loop.py        open_run, Session (setup, resume, the optimizer step, saving) and `fit`
"""

from cai.train.checkpoint import (
    CHECKPOINTS,
    FINAL,
    STATE_JSON,
    Checkpointer,
    TrainState,
    latest_checkpoint,
    load_weights,
    resume_point,
    save_pretrained,
    write_json,
)
from cai.train.config import TrainConfig, load_train_config, parse_sets
from cai.train.data import BatchStream, epoch_order, seed_everything, total_steps
from cai.train.devices import dist_info, make_accelerator
from cai.train.loop import Session, fit, open_run, start_supervised
from cai.train.metrics import METRICS, MetricsLogger, plot_curves, read_metrics
from cai.train.models import disable_dropout, prepare_model
from cai.train.optim import (
    NonFiniteError,
    build_optimizer,
    build_scheduler,
    check_finite,
    lr_factor,
)

__all__ = [
    "CHECKPOINTS", "FINAL", "METRICS", "STATE_JSON", "BatchStream", "Checkpointer", "MetricsLogger", "NonFiniteError",
    "Session", "TrainConfig", "TrainState", "build_optimizer", "build_scheduler", "check_finite", "disable_dropout",
    "dist_info", "epoch_order", "fit", "latest_checkpoint", "load_train_config", "load_weights", "lr_factor",
    "make_accelerator", "open_run", "parse_sets", "plot_curves", "prepare_model", "read_metrics", "resume_point",
    "save_pretrained", "seed_everything", "start_supervised", "total_steps", "write_json",
]
