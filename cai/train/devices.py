"""accelerate drives devices: one process on CPU or one GPU needs no launcher, and the same code
runs under `accelerate launch` (DDP, FSDP; under FSDP cai.train.fsdp shards the trained models). bf16
is mixed precision (fp32 master weights)."""

from __future__ import annotations

from typing import Any

import torch

from cai.errors import CaiError
from cai.train.config import TrainConfig


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
