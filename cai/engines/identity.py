"""A model id that is the same on every machine: what provenance, row ids and fingerprints record.

Rule: a hub id stays as given ("google/gemma-3-1b-it"); a directory inside a Hugging Face cache
(`models--org--name/snapshots/<revision>`) is "org/name@<revision>"; any other local directory is
"<architecture>@sha256:<16 hex>" over its config.json bytes and the names and sizes of its weight
files. A local path is never recorded: two machines holding the same model in different folders
must make the same row ids, and a renamed folder must not invalidate a run.
Weight *contents* are not hashed (tens of GB); names + sizes + config tell checkpoints apart in
practice, and a user who edits weights in place can pass `model_id` explicitly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def _hub_cache_id(path: Path) -> str | None:
    """'org/name@revision' for .../models--org--name/snapshots/<revision>, else None."""
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/") + "@" + parts[-1]
    return None


def local_model_digest(path: Path) -> str:
    """'<architecture>@sha256:<16 hex>' of config.json and the weight files' names and sizes."""
    h = hashlib.sha256()
    config = path / "config.json"
    architecture = "model"
    if config.is_file():
        raw = config.read_bytes()
        h.update(raw)
        try:
            archs = json.loads(raw).get("architectures") or []
            architecture = str(archs[0]) if archs else architecture
        except (ValueError, AttributeError):
            pass
    weights = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    for p in weights:
        h.update(f"\0{p.relative_to(path).as_posix()}\0{p.stat().st_size}".encode())
    return f"{architecture}@sha256:{h.hexdigest()[:16]}"


def stable_model_id(model: str | Path) -> str:
    """The id to record for `model` (a local directory or a hub id), by the rule above."""
    path = Path(model)
    if not path.is_dir():
        return str(model)  # a hub id (resolved from the local cache by the engine)
    path = path.resolve()
    return _hub_cache_id(path) or local_model_digest(path)
