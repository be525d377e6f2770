"""Turn a stage's JSONL output into `datasets` tables in the forms trainers read directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cai.errors import CaiError
from cai.records import SFTRecord
from cai.store import export_tables, meta_path, read_records


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


def export_stage_output(path: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Export any stage output file; the stage is read from its .meta.json sidecar."""
    p = Path(path)
    if not p.exists():
        raise CaiError(f"{p}: file not found")
    meta_file = meta_path(p)
    stage = json.loads(meta_file.read_text())["stage"] if meta_file.exists() else "critique"
    if stage == "critique":
        tables = sft_tables(read_records(p, SFTRecord))
    elif stage == "label":
        from cai.stages.label import label_tables

        tables = label_tables(p)
    else:
        raise CaiError(f"{p}: don't know how to export output of stage {stage!r}")
    export_tables(tables, out_dir)
    return {name: len(rows) for name, rows in tables.items()}
