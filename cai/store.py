"""Append-only JSONL output with resume, torn-line repair, config fingerprints, one writer and datasets export.

Every stage writes through `JsonlStore`: one row per line, written and fsynced as it is made,
so a kill loses at most the row being written, and a rerun skips the ids already on disk.
A sidecar `<out>.meta.json` records the stage config; reopening with a different config is
refused unless `force=True`, which moves the old file aside instead of mixing rows.

Integrity rules, all kept here:
- one writer: the store holds an exclusive lock on `<out>.lock` (cai.locking) while open, so a
  second process writing the same output stops at once with the holder's pid;
- one row per id: files written before the lock existed can hold an id twice; readers keep the
  first row of each id and warn with the count, and a resuming store rewrites the file without them;
- a failed write (disk full) removes the partial row and says how many rows are kept.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cai.errors import CaiError, InputError
from cai.hashing import sha256_of
from cai.locking import Lock, check_free, lock_output
from cai.textio import iter_lines, parse_json_line, read_json

R = TypeVar("R", bound=BaseModel)
log = logging.getLogger(__name__)


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


class SourcePlan(BaseModel):
    """What a stage run set out to cover: its input, how many input rows it read and its shard.
    Recorded in the meta so `cai merge` can tell which source rows no part holds."""

    model_config = ConfigDict(extra="forbid")

    input: str
    rows: int = Field(ge=0, description="input rows read (after --limit); source_index runs over range(rows)")
    shard: str = Field("0/1", description="i/n: this output holds source rows i, i+n, i+2n, ...")


class StoreMeta(BaseModel):
    """The `<out>.meta.json` sidecar: the fingerprint that resume and merge check."""

    model_config = ConfigDict(extra="ignore")

    stage: str
    config_hash: str
    config: dict[str, Any] = Field(default_factory=dict)
    record_type: str | None = None
    cai_version: str | None = None
    source: SourcePlan | None = None
    merged_from: list[dict[str, Any]] | None = None


def read_meta(path: Path) -> StoreMeta | None:
    """The fingerprint sidecar of a stage output, None if it has none."""
    meta = meta_path(Path(path))
    if not meta.exists():
        return None
    try:
        return StoreMeta.model_validate(read_json(meta))
    except ValidationError as e:
        raise InputError(str(meta), f"not a valid .meta.json fingerprint ({str(e).splitlines()[0]})") from None


def write_meta(path: Path, meta: StoreMeta) -> None:
    """Write the sidecar atomically (a kill leaves the old one or the new one, never half)."""
    target = meta_path(Path(path))
    tmp = target.with_suffix(".tmp")
    fields = {k: v for k, v in meta.model_dump(mode="json").items() if v is not None}
    try:
        tmp.write_text(json.dumps(fields, indent=2, sort_keys=True, default=str))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def warn_duplicates(path: Path, count: int) -> None:
    if count:
        log.warning(
            "%s: dropped %d row(s) whose id appeared earlier in the file (written twice, e.g. by two processes "
            "at once); kept the first row of each id.", path, count,
        )


def unique_ids(rows: Iterable[tuple[int, dict[str, Any]]], path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Pass (line, row) pairs through, keeping only the first row of each string `id` (rows without
    one all pass); warns once at the end with how many were dropped."""
    seen: set[str] = set()
    duplicates = 0
    for lineno, obj in rows:
        rid = obj.get("id")
        if isinstance(rid, str):
            if rid in seen:
                duplicates += 1
                continue
            seen.add(rid)
        yield lineno, obj
    warn_duplicates(Path(path), duplicates)


def read_records(path: Path, record_type: type[R]) -> list[R]:
    """Load every row of a stage output as its pydantic record, naming the line of any bad row.
    A repeated id keeps its first row; the others are dropped with a warning naming the count."""
    out: list[R] = []
    for lineno, obj in unique_ids(iter_jsonl(path), path):
        try:
            out.append(record_type.model_validate(obj))
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or None
            raise InputError(str(path), first["msg"], line=lineno, field=field) from None
    return out


def write_lines_atomic(path: Path, lines: Iterable[bytes]) -> None:
    """Write `path` from whole lines (each ending in a newline) so that a kill or a full disk
    leaves the old file or the new one, never a mix; a failed write removes the temporary file."""
    tmp = path.with_name(path.name + ".partial")
    try:
        with tmp.open("wb") as dst:
            for line in lines:
                dst.write(line)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _drop_lines(path: Path, linenos: set[int]) -> None:
    """Rewrite `path` without the given (1-based) lines, atomically."""
    with path.open("rb") as src:
        write_lines_atomic(path, (line for lineno, line in enumerate(src, start=1) if lineno not in linenos))


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The top-level config fields whose values differ (what to name when fingerprints disagree)."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _refuse_directory(path: Path) -> None:
    if path.is_dir():  # never moved aside or written into: a directory is the user's
        raise CaiError(f"output {path} is a directory, but a stage writes one JSONL file; give a file "
                       f"path such as {path / 'out.jsonl'}")


def check_output(path: str | Path) -> None:
    """What a stage checks about its output before minutes of model loading: that it is not a
    directory and that no other live process writes it. `JsonlStore` checks both again when it
    opens, and its lock is what guarantees one writer."""
    _refuse_directory(Path(path))
    check_free(path)


class JsonlStore(Generic[R]):
    """An append-only JSONL file of `record_type` rows keyed by their `id` field, written by one process.

    Opening takes the output's lock (raising `cai.locking.InUseError` if another live process
    writes it), checks the fingerprint, repairs a torn last line, drops repeated ids and loads the
    ids on disk; `close()` (or leaving the `with` block) releases the lock.
    """

    def __init__(
        self,
        path: str | Path,
        record_type: type[R],
        stage: str,
        config: dict[str, Any],
        force: bool = False,
        source: SourcePlan | None = None,
    ) -> None:
        self.path = Path(path)
        _refuse_directory(self.path)
        self.record_type = record_type
        self.stage = stage
        self.config = config
        self.config_hash = sha256_of(config)[:16]
        self.source = source
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock: Lock | None = lock_output(self.path)
        self._fd: int | None = None
        try:
            self._check_fingerprint(force)
            self.dropped_bytes = repair_torn_tail(self.path)
            self._ids: set[str] = self._load_ids()
            self._write_meta()
        except BaseException:
            self.close()
            raise

    def _load_ids(self) -> set[str]:
        """The ids on disk; a file holding an id twice is rewritten without the later copies."""
        ids: set[str] = set()
        if not self.path.exists():
            return ids
        repeated: set[int] = set()
        for lineno, obj in iter_jsonl(self.path):
            if "id" not in obj:
                raise InputError(str(self.path), "row has no 'id'", line=lineno)
            if obj["id"] in ids:
                repeated.add(lineno)
            ids.add(obj["id"])
        if repeated:
            warn_duplicates(self.path, len(repeated))
            try:
                _drop_lines(self.path, repeated)
            except OSError as e:  # readers still drop them; the next resume tries again
                log.warning("%s: could not rewrite the file without its repeated ids (%s)", self.path, e.strerror)
        return ids

    def _check_fingerprint(self, force: bool) -> None:
        meta = meta_path(self.path)
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        old = read_meta(self.path)
        if old is not None and old.stage == self.stage and old.config_hash == self.config_hash:
            return
        if not force:
            what = "was written by a different stage config" if old else "has no .meta.json fingerprint"
            changed = ""
            if old is not None:
                keys = changed_keys(old.config, self.config)
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

        meta = StoreMeta(
            stage=self.stage, config_hash=self.config_hash, config=self.config,
            record_type=self.record_type.__name__, cai_version=__version__, source=self.source,
        )
        try:
            write_meta(self.path, meta)
        except OSError as e:
            raise CaiError(
                f"{meta_path(self.path)}: could not write the fingerprint ({e.strerror}). Nothing was lost: the "
                f"{len(self._ids)} rows in {self.path} are kept. Free some space (or fix the folder's permissions) "
                "and rerun the same command to resume."
            ) from None

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> set[str]:
        return set(self._ids)

    def append(self, record: R) -> None:
        """Write one row durably. A row whose id is already on disk is skipped (idempotent).
        A failed write (disk full) removes what it wrote of the row and raises a `CaiError`."""
        rid = record.id
        if rid in self._ids:
            return
        if self._lock is None:
            raise RuntimeError(f"{self.path}: append after close()")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        data = (record.model_dump_json() + "\n").encode("utf-8")
        size_before = os.fstat(self._fd).st_size
        try:
            _write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as e:
            raise CaiError(self._write_failed(e, size_before)) from None
        self._ids.add(rid)

    def _write_failed(self, e: OSError, size_before: int) -> str:
        """Cut the partial row off and say what is kept."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, size_before)
            undone = "the row being written was removed again"
        except OSError:
            undone = "the partial row being written is cut off on the next run"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            problem, fix = "the disk is full", "Free some space (or choose an output on another disk)"
        else:
            problem, fix = f"a write failed ({e.strerror})", "Fix the cause"
        return (
            f"{self.path}: {problem}. The {len(self._ids)} complete rows already written are kept "
            f"({undone}). {fix} and rerun the same command: it resumes, skipping the rows kept."
        )

    def records(self) -> list[R]:
        return read_records(self.path, self.record_type) if self.path.exists() else []

    def close(self) -> None:
        """Close the file and release the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

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
