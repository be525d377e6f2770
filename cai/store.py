"""Append-only JSONL output with resume, torn-line repair, config fingerprints and datasets export.

Every stage writes through `JsonlStore`: one row per line, flushed and fsynced as it is written,
so a kill loses at most the row being written, and a rerun skips the ids already on disk.
A sidecar `<out>.meta.json` records the stage config; reopening with a different config is
refused unless `force=True`, which moves the old file aside instead of mixing rows.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from cai.errors import CaiError, InputError
from cai.hashing import sha256_of
from cai.textio import iter_lines, parse_json_line, read_json

R = TypeVar("R", bound=BaseModel)


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def repair_torn_tail(path: Path) -> int:
    """Drop a partial last line left by a crash (no trailing newline). Returns bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    with path.open("rb+") as f:
        pos = size
        while pos > 0:
            start = max(0, pos - (1 << 16))
            f.seek(start)
            idx = f.read(pos - start).rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        else:
            keep = 0
        if keep < size:
            f.truncate(keep)
    return size - keep


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a .jsonl (or .jsonl.gz) file; a bad line
    raises InputError naming it."""
    path = Path(path)
    for lineno, line in iter_lines(path):  # bad UTF-8, bad gzip and lone surrogates name the line
        if not line.strip():
            continue
        obj = parse_json_line(line, path, lineno)
        if not isinstance(obj, dict):
            raise InputError(str(path), "expected a JSON object", line=lineno)
        yield lineno, obj


def read_records(path: Path, record_type: type[R]) -> list[R]:
    """Load every row of a stage output as its pydantic record, naming the line of any bad row."""
    out: list[R] = []
    for lineno, obj in iter_jsonl(path):
        try:
            out.append(record_type.model_validate(obj))
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or None
            raise InputError(str(path), first["msg"], line=lineno, field=field) from None
    return out


class JsonlStore(Generic[R]):
    """An append-only JSONL file of `record_type` rows keyed by their `id` field."""

    def __init__(
        self,
        path: str | Path,
        record_type: type[R],
        stage: str,
        config: dict[str, Any],
        force: bool = False,
    ) -> None:
        self.path = Path(path)
        if self.path.is_dir():  # never moved aside or written into: a directory is the user's
            raise CaiError(f"output {self.path} is a directory, but a stage writes one JSONL file; give a file "
                           f"path such as {self.path / 'out.jsonl'}")
        self.record_type = record_type
        self.stage = stage
        self.config = config
        self.config_hash = sha256_of(config)[:16]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dropped_bytes = 0
        self._check_fingerprint(force)
        self.dropped_bytes = repair_torn_tail(self.path)
        self._ids: set[str] = set()
        if self.path.exists():
            for lineno, obj in iter_jsonl(self.path):
                if "id" not in obj:
                    raise InputError(str(self.path), "row has no 'id'", line=lineno)
                self._ids.add(obj["id"])
        self._write_meta()
        self._fh = None

    def _check_fingerprint(self, force: bool) -> None:
        meta = meta_path(self.path)
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        old = read_json(meta) if meta.exists() else None
        if old is not None and old.get("stage") == self.stage and old.get("config_hash") == self.config_hash:
            return
        if not force:
            what = "was written by a different stage config" if old else "has no .meta.json fingerprint"
            changed = ""
            if old and isinstance(old.get("config"), dict):
                keys = sorted(
                    k for k in set(old["config"]) | set(self.config)
                    if old["config"].get(k) != self.config.get(k)
                )
                changed = f" (changed: {', '.join(keys)})" if keys else ""
            raise CaiError(
                f"{self.path} {what}{changed}. Rerun with the same settings to resume it, pass "
                "--force to move the old file aside and start over, or choose a new output path."
            )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.path.rename(self.path.with_name(f"{self.path.name}.{stamp}.bak"))
        if meta.exists():
            meta.rename(meta.with_name(f"{meta.name}.{stamp}.bak"))

    def _write_meta(self) -> None:
        from cai import __version__

        meta = {
            "stage": self.stage,
            "config_hash": self.config_hash,
            "config": self.config,
            "record_type": self.record_type.__name__,
            "cai_version": __version__,
        }
        tmp = meta_path(self.path).with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        os.replace(tmp, meta_path(self.path))

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> set[str]:
        return set(self._ids)

    def append(self, record: R) -> None:
        """Write one row durably. A row whose id is already on disk is skipped (idempotent)."""
        rid = record.id
        if rid in self._ids:
            return
        if self._fh is None:
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write(record.model_dump_json() + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._ids.add(rid)

    def records(self) -> list[R]:
        self.flush()
        return read_records(self.path, self.record_type) if self.path.exists() else []

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> JsonlStore[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def export_tables(tables: dict[str, list[dict[str, Any]]], out_dir: str | Path) -> dict[str, Path]:
    """Write each named table as a `datasets` dataset (save_to_disk) and a parquet file.

    Layout: OUT/<name>/ (load with datasets.load_from_disk) and OUT/<name>.parquet.
    """
    from datasets import Dataset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, rows in tables.items():
        ds = Dataset.from_list(rows)
        ds.save_to_disk(str(out / name))
        ds.to_parquet(str(out / f"{name}.parquet"))
        written[name] = out / name
    return written
