"""Model fields that name a local path which does not exist, caught before any loader runs.

A trainer config's `model`, `reward_model`, `critic_model` or `judge_model` is a local directory or a hub id in
the local cache. Handed a mistyped directory, the Hugging Face loaders answer with a message about
hub repository ids, which misleads. A value that can only be a path (it starts with `/`, `.` or
`~`, has two or more `/`, or its first folder exists here) and does not exist is reported as
exactly that, naming the config file, line and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cai.errors import InputError

MODEL_FIELDS = ("model", "reward_model", "critic_model", "judge_model")


def looks_like_path(value: str) -> bool:
    """True when `value` cannot be a hub id (`name` or `org/name`), or its first part is a local folder."""
    if value.startswith(("/", ".", "~")) or value.count("/") >= 2 or value.endswith("/") or "\\" in value:
        return True
    return "/" in value and Path(value.split("/", 1)[0]).is_dir()


def check_model_paths(config: Any, config_path: str | Path) -> None:
    """Raise an InputError for the first model field holding a local path that does not exist."""
    from cai.yamlio import load_yaml

    for field in MODEL_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, str) and looks_like_path(value) and not Path(value).expanduser().exists():
            line = load_yaml(config_path).lines.get((field,))
            raise InputError(str(config_path), f"{value} does not exist; give an existing model directory "
                             "(for reward_model: the final/ folder `cai train rm` wrote)", line=line, field=field)
