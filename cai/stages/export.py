"""Turn a stage's JSONL output into `datasets` tables in the forms trainers read directly.

An output with no rows is an error (an empty dataset that trains on nothing is never what was
meant), and so is a filter that leaves nothing. Tables are written into a temporary folder next to
the destination and moved into place only when every table is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cai.errors import CaiError, InputError
from cai.records import SFTRecord
from cai.stages.flag_filter import drop_reason, tally
from cai.store import export_tables, meta_path, read_records
from cai.textio import read_json


def sft_tables(records: list[SFTRecord]) -> dict[str, list[dict[str, Any]]]:
    """`messages` (chat SFT), `prompt_completion` (conversational prompt/completion) and
    `pairs` (prompt/chosen/rejected: the revision preferred over the initial response, for rows where
    the revision changed it and is not empty)."""
    messages, prompt_completion, pairs = [], [], []
    for r in records:
        prompt = [m.model_dump() for m in r.prompt]
        final = [{"role": "assistant", "content": r.final_response}]
        messages.append({"id": r.id, "messages": r.messages()})
        prompt_completion.append({"id": r.id, "prompt": prompt, "completion": final})
        if not (r.flags.revision_unchanged or r.flags.empty):
            pairs.append({
                "id": r.id, "prompt": prompt, "chosen": final,
                "rejected": [{"role": "assistant", "content": r.initial_response}],
            })
    return {"messages": messages, "prompt_completion": prompt_completion, "pairs": pairs}


def _stage_of(p: Path) -> str:
    meta_file = meta_path(p)
    if not meta_file.exists():
        return "critique"
    meta = read_json(meta_file)
    if not isinstance(meta, dict) or not isinstance(meta.get("stage"), str):
        raise InputError(str(meta_file), "has no 'stage' field; it is not a cai output sidecar")
    return meta["stage"]


def export_tables_of(path: str | Path, drop_flags: tuple[str, ...] = ()
                     ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """The tables of a stage output (the stage is read from its .meta.json sidecar) without the rows
    carrying a flag in `drop_flags`, and the dropped rows counted per flag."""
    p = Path(path)
    if not p.exists():
        raise InputError(str(p), "file not found")
    if p.is_dir():
        raise InputError(str(p), "is a directory; give the JSONL file written by cai generate or cai label")
    stage = _stage_of(p)
    if stage == "critique":
        records = read_records(p, SFTRecord)
        if not records:
            raise InputError(str(p), "has no rows, so there is nothing to export; run `cai generate` into it first")
        reasons = [drop_reason(set(r.flags.kinds()), drop_flags) for r in records]
        kept = [r for r, why in zip(records, reasons) if why is None]
        if not kept:
            raise CaiError(f"{p}: every one of its {len(records)} rows was dropped by --drop-flag "
                           f"{' '.join(drop_flags)}; nothing is left to export")
        return sft_tables(kept), tally(reasons)
    if stage == "label":
        from cai.stages.label import label_tables

        tables = label_tables(p)
        if not tables["labels"]:
            raise InputError(str(p), "has no rows, so there is nothing to export; run `cai label` into it first")
        return tables, {}
    raise CaiError(f"{p}: don't know how to export output of stage {stage!r}")


def check_out_dir(out: Path) -> None:
    """A file where the tables' folder should go is the user's: refuse it before reading anything."""
    if out.exists() and not out.is_dir():
        raise CaiError(f"--out {out} is an existing file; cai export writes a directory of tables, choose a "
                       "directory path")


def write_tables(tables: dict[str, list[dict[str, Any]]], out_dir: str | Path) -> None:
    """Write the tables under `out_dir` (datasets dir + parquet each) through a temporary folder."""
    out = Path(out_dir)
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        export_tables(tables, tmp)
        for entry in sorted(Path(tmp).iterdir()):
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)


def export_stage_output(path: str | Path, out_dir: str | Path, drop_flags: tuple[str, ...] = ()) -> dict[str, int]:
    """Export a stage output file; returns the rows written per table."""
    check_out_dir(Path(out_dir))
    tables, _ = export_tables_of(path, drop_flags)
    write_tables(tables, out_dir)
    return {name: len(rows) for name, rows in tables.items()}
