"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the trainers: sharding, and the places where
a sharded model has to be whole again.

Why it looks like this:
- Under `accelerate launch` with an FSDP config, the Session shards each trainable module here
  rather than through accelerate's `prepare` (whose FSDP2 path takes one model together with its
  optimizer per call, while a Session has one optimizer over several modules): each transformer
  block, then the whole module, on a one-dimensional mesh of all processes, resharding after each
  block's forward. accelerate (1.15) turns FSDP on for GPU processes only, so on CPU processes
  (gloo; the tests) the same launcher request (ACCELERATE_USE_FSDP=true) is read here too. Mixed
  precision stays accelerate's autocast, as under DDP.
- Rollout generation runs a different number of forward passes on each process (rows end at
  different tokens), so it cannot all-gather layer by layer in lockstep: `gathered` all-gathers
  every parameter once, generates unsharded, and shards again.
- Checkpoints and final/ hold full tensors (a normal HF model dir that any world size loads);
  `full_state_dict`, `load_full_state_dict` and `FullOptimizerState` convert at the edges, so the
  checkpoint code does not care whether a model is sharded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from cai.errors import CaiError


def requested(acc: Any) -> bool:
    """Whether this run's trainable modules are sharded: the launcher asked for FSDP (accelerate's
    FSDP type on GPUs; ACCELERATE_USE_FSDP=true on several CPU processes, which accelerate ignores)."""
    if acc.distributed_type.value == "FSDP":
        return True
    return acc.num_processes > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of every transformers model inside `module` (its `_no_split_modules`)."""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in module.modules() if type(m).__name__ in names]


def shard(module: torch.nn.Module, acc: Any) -> torch.nn.Module:
    """fully_shard each transformer block of `module`, then `module` itself (embeddings, heads and
    anything else left), over all processes; returns the module (sharded in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))  # fully_shard moves each part onto it
    for block in _blocks(module):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(module, mesh=mesh)
    return module


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every process calls it), else `t`."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def gathered(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block every FSDP2 part of `module` holds its full parameters and keeps them
    across forward passes, so a process may run any number of them (generation) with no
    collective. After it, blocks reshard after each forward again and the root does not (FSDP2's
    defaults). A module that is not sharded passes through."""
    from torch.distributed.fsdp import FSDPModule

    parts = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for part in parts:
        part.set_reshard_after_forward(False, recurse=False)
        part.unshard()
    try:
        yield
    finally:
        for part in parts:
            part.reshard()
            part.set_reshard_after_forward(part is not module, recurse=False)


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with every shard gathered into its full tensor (a collective), one
    tensor at a time, kept on CPU by the main process only (the one that writes; the others get an
    empty dict). Tied parameters (embeddings = LM head) stay one tensor, so save_pretrained still
    sees the tie."""
    keep = _is_main()
    gathered_once: dict[int, torch.Tensor] = {}
    out = {}
    for key, value in module.state_dict(keep_vars=True).items():
        if id(value) not in gathered_once:
            whole = full_tensor(value.detach())
            gathered_once[id(value)] = whole.cpu() if keep else whole.new_empty(0)
        if keep:
            out[key] = gathered_once[id(value)]
    return out


def load_full_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy full tensors into a (possibly sharded) module: each process keeps its own shard of
    each. Returns (missing keys, unexpected keys), as `load_state_dict(strict=False)` does."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = module.state_dict()
    with torch.no_grad():
        for key, target in own.items():
            if key not in state:
                continue
            source = state[key].to(dtype=target.dtype)
            if isinstance(target, DTensor):
                mesh = target.device_mesh
                source = distribute_tensor(source.to(mesh.device_type), mesh, target.placements).to_local()
                target = target.to_local()
            target.copy_(source.to(target.device))
    return [k for k in own if k not in state], [k for k in state if k not in own]


class FullState:
    """A sharded module seen by the checkpointer as a stateful object with full tensors."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.module)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = load_full_state_dict(self.module, state)
        if missing or unexpected:
            raise CaiError(f"a checkpoint's state does not match the module: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}; resume with the config that wrote it")


class FullOptimizerState:
    """The optimizer of sharded modules, seen by the checkpointer with full tensors keyed by parameter
    name (torch.distributed.checkpoint's full optimizer state dict): a checkpoint does not depend on
    how the parameters were split. Saving: only the main process gets the state (it writes it);
    loading: every process reads the file and keeps its own shards."""

    def __init__(self, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer):
        self.model = torch.nn.ModuleDict(modules)
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        # cpu_offload: gathered tensor by tensor onto the main process's CPU (the others get an empty dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))
