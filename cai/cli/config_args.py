"""A stage config from command-line flags, or from a --config YAML with the flags as overrides."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import BaseModel, ValidationError

from cai.errors import CaiError

# The data stages' executor flags: CLI flag -> (config field, type, help)
EXECUTOR_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--executor": ("executor", str, "local (default: this process) or ray (Ray actors, one engine each)"),
    "--ray-address": ("ray_address", str, "with --executor ray: auto = the running cluster (default: start a local Ray)"),
    "--ray-workers": ("ray_workers", int, "with --executor ray: actors, each with its own engine (default 1)"),
    "--ray-gpus-per-worker": ("ray_gpus_per_worker", float,
                              "with --executor ray: GPUs per actor, = tensor_parallel_size for vllm (default 0)"),
    "--ray-cpus-per-worker": ("ray_cpus_per_worker", int,
                              "with --executor ray: CPUs (and torch threads) per actor (default 1)"),
}


def config_from_args(args: argparse.Namespace, model: type[BaseModel], fields: list[str],
                     required: tuple[str, ...], command: str) -> Any:
    """`fields` are the config fields that flags may set (a flag left unset is None). Repeated
    `--engine-option key=value` items, when the command has them, go into engine_options (merged into
    the file's with --config). Without --config the `required` fields must come from flags."""
    from cai.yamlio import load_model, parse_override

    overrides = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
    if getattr(args, "engine_option", None):
        options = dict(parse_override(item) for item in args.engine_option)
        if args.config:  # merged into the config file's engine_options
            overrides.update({f"engine_options.{k}": v for k, v in options.items()})
        else:
            overrides["engine_options"] = options
    if args.config:
        return load_model(args.config, model, overrides)
    missing = [f"--{k.replace('_', '-')}" for k in required if k not in overrides]
    if missing:
        raise CaiError(f"{command} needs {', '.join(missing)} (or a --config YAML that sets them)")
    try:
        return model.model_validate(overrides)
    except ValidationError as err:
        first = err.errors()[0]
        where = f"--{str(first['loc'][0]).replace('_', '-')}: " if first["loc"] else ""
        raise CaiError(f"{command}: {where}{first['msg']}") from None
