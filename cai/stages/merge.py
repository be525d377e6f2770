"""`cai merge`: join the shard outputs of one stage run (`--shard i/n` on n machines) into one file.

Rules, so a merge can never quietly hand a trainer the wrong data:
- parts must share one fingerprint (stage and config hash of their `.meta.json`); a part written
  with other settings is refused, naming the settings that differ;
- nothing is dropped: every id found in any part is written once. The same id twice with the same
  content (a shard merged twice) is reported; with different content (a shard run twice on an
  engine that is not batch-invariant) the merge is refused, as it cannot choose;
- missing source rows are found by `source_index` against the input: `--input FILE` (every row of
  it), else what the parts' `.meta.json` record (input row count and shard). Missing rows refuse
  the merge unless `--allow-incomplete`. This holds for `critique` (cai generate) outputs, which
  write one row per input row with a 0-based `source_index`; `label` outputs are not checked (they
  number rows by input line and write no row for a pair of identical responses), and say so;
- a part still being written (its lock held) is refused; the output is written atomically, with
  a `.meta.json` carrying the shared fingerprint (so the stage can resume into it) and a
  `<out>.merge.json` summary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from cai.errors import CaiError, InputError
from cai.hashing import sha256_of
from cai.locking import lock_output
from cai.stages.inputs import iter_rows, parse_shard
from cai.store import (
    SourcePlan,
    StoreMeta,
    changed_keys,
    iter_jsonl,
    read_meta,
    write_lines_atomic,
    write_meta,
)

_SHOWN = 5  # ids / indices named in a message
_ONE_ROW_PER_SOURCE = {"critique"}  # stages writing one row per input row, source_index = its 0-based position


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parts: list[Path] = Field(min_length=1)
    out: Path
    input: Path | None = Field(None, description="the stage's input file, to find source rows no part holds")
    allow_incomplete: bool = False
    force: bool = Field(False, description="replace an existing output")


class PartReport(BaseModel):
    path: str
    rows: int
    shard: str | None = None
    torn_tail: bool = Field(False, description="the part ends in a partial row (its writer was killed)")


class MergeSummary(BaseModel):
    out: str
    stage: str
    config_hash: str
    parts: list[PartReport]
    rows_written: int
    duplicate_ids: int = Field(description="ids found again with the same content (written once)")
    duplicate_examples: list[str] = Field(default_factory=list, description="the first few of them")
    source_rows: int | None = Field(None, description="input rows expected; None when not known")
    missing_rows: int = 0
    missing_indices: list[int] = Field(default_factory=list, description="source_index values no part holds")

    def render(self) -> str:
        if self.source_rows is not None:
            checked = f"{self.missing_rows} of {self.source_rows} source rows missing"
        elif self.stage in _ONE_ROW_PER_SOURCE:
            checked = "source rows not checked (the parts record no input; pass --input)"
        else:
            checked = f"source rows not checked (stage {self.stage} may skip inputs on purpose)"
        head = (f"merged {len(self.parts)} parts into {self.out}: {self.rows_written} rows, "
                f"{self.duplicate_ids} duplicate ids written once, {checked}")
        lines = [head]
        for p in self.parts:
            torn = " (ends in a partial row: its writer was killed)" if p.torn_tail else ""
            lines.append(f"  {p.path}" + (f" (shard {p.shard})" if p.shard else "") + f": {p.rows} rows{torn}")
        return "\n".join(lines)


class _Row(NamedTuple):
    """Where a row is (rows are copied from the parts byte for byte, not held in memory)."""

    part: int
    offset: int
    length: int
    source_index: int | None
    content: str  # digest of the row without its creation time: tells a true duplicate from a conflict


def _content_key(obj: dict[str, Any]) -> str:
    prov = obj.get("provenance")
    if isinstance(prov, dict):
        obj = {**obj, "provenance": {k: v for k, v in prov.items() if k != "created_at"}}
    return sha256_of(obj)


def _check_fingerprints(parts: list[Path]) -> list[StoreMeta]:
    metas = []
    for part in parts:
        if not part.is_file():
            raise InputError(str(part), "file not found (a part to merge)")
        meta = read_meta(part)
        if meta is None:
            raise CaiError(f"{part} has no .meta.json fingerprint, so it cannot be checked against the other parts. "
                           "Merge only outputs of cai generate / cai label, with their .meta.json files beside them.")
        metas.append(meta)
    first = metas[0]
    for part, meta in zip(parts[1:], metas[1:]):
        if (meta.stage, meta.config_hash) != (first.stage, first.config_hash):
            what = f"stage {meta.stage!r} vs {first.stage!r}" if meta.stage != first.stage else (
                "changed: " + (", ".join(changed_keys(first.config, meta.config)) or "the config"))
            raise CaiError(f"{part} was written with other settings than {parts[0]} ({what}), so their rows do not "
                           "belong in one file. Rerun that shard with the same settings, or merge it separately.")
    return metas


def _read_part(path: Path, index: int) -> tuple[list[tuple[str, _Row]], bool]:
    """(id, row) of every complete line of a part, and whether it ends in a torn (partial) row."""
    offsets, torn = [0], False
    with path.open("rb") as f:
        for line in f:
            offsets.append(offsets[-1] + len(line))
            torn = not line.endswith(b"\n")
    complete = len(offsets) - 1 - torn  # a last line without its newline is a partial write, as on resume
    rows: list[tuple[str, _Row]] = []
    try:
        for lineno, obj in iter_jsonl(path):
            if lineno > complete:
                break
            if not isinstance(obj.get("id"), str):
                raise InputError(str(path), "row has no 'id'", line=lineno)
            src = obj.get("source_index")
            start, end = offsets[lineno - 1], offsets[lineno]
            rows.append((obj["id"], _Row(part=index, offset=start, length=end - start, content=_content_key(obj),
                                         source_index=src if isinstance(src, int) else None)))
    except InputError as e:
        if not (torn and e.line == len(offsets) - 1):
            raise
    return rows, torn


def _copy_rows(parts: list[Path], rows: list[_Row]) -> Iterator[bytes]:
    with ExitStack() as stack:
        files = [stack.enter_context(p.open("rb")) for p in parts]
        for r in rows:
            files[r.part].seek(r.offset)
            yield files[r.part].read(r.length)


def _expected_rows(config: MergeConfig, metas: list[StoreMeta]) -> tuple[int | None, str | None]:
    """(number of source rows, where that number comes from) or (None, None) when nothing says."""
    stage = metas[0].stage
    if stage not in _ONE_ROW_PER_SOURCE:
        if config.input is not None:
            raise CaiError(f"--input: completeness is checked for outputs of stages {sorted(_ONE_ROW_PER_SOURCE)}, "
                           f"not {stage!r} (it may write no row for some inputs on purpose). Drop --input; the merge "
                           "still refuses mixed settings and conflicting ids.")
        return None, None
    if config.input is not None:
        return sum(1 for _ in iter_rows(config.input)), str(config.input)
    sources = [m.source for m in metas]
    if any(s is None for s in sources):
        return None, None
    counts = {s.rows for s in sources if s is not None}  # paths may differ between machines; counts may not
    if len(counts) > 1:
        raise CaiError("the parts' .meta.json files record inputs of different lengths "
                       f"({', '.join(f'{s.input}: {s.rows} rows' for s in sources if s is not None)}): were the "
                       "shards run on different prompt files? Pass --input to say which one the merge is checked against.")
    return counts.pop(), sources[0].input if sources[0] is not None else None


def _missing_message(missing: list[int], n_rows: int, origin: str, metas: list[StoreMeta],
                     parts: list[Path]) -> str:
    specs = {m.source.shard: p for m, p in zip(metas, parts) if m.source is not None}
    per_shard = ""
    if specs:
        n = parse_shard(next(iter(specs)))[1]
        counts = Counter(i % n for i in missing)
        per_shard = "; by shard: " + ", ".join(
            f"{i}/{n}: {c} ({specs[f'{i}/{n}'].name if f'{i}/{n}' in specs else 'no part given'})"
            for i, c in sorted(counts.items()))
    shown = ", ".join(str(i) for i in missing[:_SHOWN]) + (", ..." if len(missing) > _SHOWN else "")
    return (f"{len(missing)} of the {n_rows} source rows of {origin} are in no part (source_index "
            f"{shown}){per_shard}. Rerun the unfinished shards with the same command to complete them (a rerun "
            "resumes), or pass --allow-incomplete to merge what there is (the stage, rerun with the same settings and "
            "--out set to the merged file, then fills in the rest).")


def merge_parts(config: MergeConfig) -> MergeSummary:
    """Check, join and write the parts; returns the summary (also written to `<out>.merge.json`)."""
    parts = [Path(p) for p in config.parts]
    out = Path(config.out)
    resolved = [p.resolve() for p in parts]
    if len(set(resolved)) < len(resolved):
        raise CaiError("a part is named twice on the command line; name each shard output once.")
    if out.resolve() in resolved:
        raise CaiError(f"--out {out} is also a part; write the merge to a new file.")
    if out.exists() and not config.force:
        raise CaiError(f"--out {out} already exists; pass --force to replace it, or choose another path.")
    metas = _check_fingerprints(parts)
    with ExitStack() as held:
        for part in parts:  # a part whose writer still runs is not finished
            held.callback(lock_output(part).release)
        held.callback(lock_output(out).release)
        return _merge_locked(config, parts, out, metas)


def _merge_locked(config: MergeConfig, parts: list[Path], out: Path, metas: list[StoreMeta]) -> MergeSummary:
    rows: dict[str, _Row] = {}
    duplicates: list[str] = []
    conflicts: list[str] = []
    reports: list[PartReport] = []
    for index, (part, meta) in enumerate(zip(parts, metas)):
        found, torn = _read_part(part, index)
        reports.append(PartReport(path=str(part), rows=len(found), torn_tail=torn,
                                  shard=meta.source.shard if meta.source else None))
        for rid, row in found:
            if rid not in rows:
                rows[rid] = row
            elif rows[rid].content == row.content:
                duplicates.append(rid)
            else:
                conflicts.append(rid)
    if conflicts:
        raise CaiError(
            f"{len(conflicts)} ids appear in more than one part with different content (e.g. {', '.join(conflicts[:_SHOWN])}"
            f"; the first copy is in {parts[rows[conflicts[0]].part]}): the same shard was probably run twice. "
            "Merge only one output of each shard. Nothing was written.")
    n_rows, origin = _expected_rows(config, metas)
    missing: list[int] = []
    if n_rows is not None:
        held = {r.source_index for r in rows.values()}
        missing = [i for i in range(n_rows) if i not in held]
        if missing and not config.allow_incomplete:
            raise CaiError(_missing_message(missing, n_rows, origin or "the input", metas, parts)
                           + " Nothing was written.")
    ordered = sorted(rows.values(), key=lambda r: (r.source_index if r.source_index is not None else -1, r.part))
    write_lines_atomic(out, _copy_rows(parts, ordered))
    first = metas[0]
    write_meta(out, first.model_copy(update={
        "source": SourcePlan(input=origin, rows=n_rows) if n_rows is not None and origin else None,
        "merged_from": [r.model_dump() for r in reports],
    }))
    summary = MergeSummary(
        out=str(out), stage=first.stage, config_hash=first.config_hash, parts=reports, rows_written=len(ordered),
        duplicate_ids=len(duplicates), duplicate_examples=duplicates[:20], source_rows=n_rows, missing_rows=len(missing), missing_indices=missing[:1000],
    )
    Path(f"{out}.merge.json").write_text(summary.model_dump_json(indent=2))
    return summary
