"""Batches are fixed by row position: a run killed mid-batch resumes to exactly the rows of an
uninterrupted run, on an engine whose numbers depend on what else is in its batch.

The engine is the tiny fp32 hf model with a forward hook that adds the batch mean of the logits to
every row's logits: an exaggerated stand-in for padding, shared-prefix and non-batch-invariant
kernel effects, large enough that a row's tokens change with its batch-mates.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_critique import CONSTITUTION as CRITIQUE_CONSTITUTION
from test_label import CONSTITUTION as LABEL_CONSTITUTION

from cai.engines import load_engine
from cai.records import SFTRecord
from cai.stages.critique import CritiqueConfig, run_critique
from cai.stages.label import LabelConfig, LabelRecord, run_label
from cai.store import read_records

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [f"how do I {'bake bread ' * (i % 4)}or fix thing {i}?" for i in range(10)]


def composition_sensitive_engine(model_dir: Path):
    engine = load_engine("hf", str(model_dir), dtype="float32", device="cpu")
    engine.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: out + out.mean(dim=0, keepdim=True)
    )
    return engine


def content(path: Path, record_type) -> dict[str, dict]:
    """Rows by id without the wall-clock timestamp."""
    rows = {}
    for r in read_records(path, record_type):
        d = r.model_dump()
        d["provenance"].pop("created_at")
        rows[r.id] = d
    return rows


def kill_after(full: Path, crashed: Path, rows: int) -> None:
    """The on-disk state of a run killed right after writing its first `rows` rows."""
    crashed.write_text("".join(full.read_text().splitlines(keepends=True)[:rows]))
    shutil.copy(f"{full}.meta.json", f"{crashed}.meta.json")


@pytest.fixture()
def workdir(tmp_path: Path, repo_root: Path) -> Path:
    (tmp_path / "c.yaml").write_text(CRITIQUE_CONSTITUTION)
    (tmp_path / "label.yaml").write_text(LABEL_CONSTITUTION)
    (tmp_path / "few_shot.yaml").write_text((repo_root / "prompts" / "critique_revision.yaml").read_text())
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    pairs = [{"prompt": p, "response_a": f"sure, step {i} is easy", "response_b": "I would rather not say"}
             for i, p in enumerate(PROMPTS)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return tmp_path


def test_critique_resumed_mid_batch_equals_uninterrupted_run(workdir: Path, tiny_model_dir: Path) -> None:
    # Sampled: greedy decoding of the random tiny model emits the same token whatever the batch.
    engine = composition_sensitive_engine(tiny_model_dir)

    def config(out: str, batch_size: int = 4) -> CritiqueConfig:
        return CritiqueConfig(prompts=workdir / "prompts.jsonl", constitution=workdir / "c.yaml", out=workdir / out,
                              model=str(tiny_model_dir), rounds=1, max_new_tokens=6, batch_size=batch_size,
                              temperature=1.0, seed=3)

    run_critique(config("full.jsonl"), engine=engine, progress=False)
    full = content(workdir / "full.jsonl", SFTRecord)
    # The engine really depends on batch composition: other batches give other rows.
    run_critique(config("other.jsonl", batch_size=3), engine=engine, progress=False)
    assert content(workdir / "other.jsonl", SFTRecord) != full

    kill_after(workdir / "full.jsonl", workdir / "crash.jsonl", rows=5)  # mid-way through batch 1 (rows 4-7)
    summary = run_critique(config("crash.jsonl"), engine=engine, progress=False)
    assert (summary.rows_skipped, summary.rows_written) == (5, 5)
    assert content(workdir / "crash.jsonl", SFTRecord) == full
    assert len((workdir / "crash.jsonl").read_text().splitlines()) == 10  # nothing written twice


def test_label_resumed_mid_batch_equals_uninterrupted_run(workdir: Path, tiny_model_dir: Path) -> None:
    engine = composition_sensitive_engine(tiny_model_dir)

    def config(out: str, batch_size: int = 4) -> LabelConfig:
        return LabelConfig(pairs=workdir / "pairs.jsonl", constitution=workdir / "label.yaml", out=workdir / out,
                           model=str(tiny_model_dir), batch_size=batch_size, seed=3)

    run_label(config("full.jsonl"), engine=engine, progress=False)
    full = content(workdir / "full.jsonl", LabelRecord)
    run_label(config("other.jsonl", batch_size=3), engine=engine, progress=False)
    assert content(workdir / "other.jsonl", LabelRecord) != full

    kill_after(workdir / "full.jsonl", workdir / "crash.jsonl", rows=6)
    summary = run_label(config("crash.jsonl"), engine=engine, progress=False)
    assert (summary.rows_skipped, summary.rows_written) == (6, 4)
    assert content(workdir / "crash.jsonl", LabelRecord) == full
    assert len((workdir / "crash.jsonl").read_text().splitlines()) == 10


def test_label_eval_resumed_mid_batch_equals_uninterrupted_run(workdir: Path, tiny_model_dir: Path) -> None:
    from cai.stages.label_eval import EvalConfig, run_label_eval

    engine = composition_sensitive_engine(tiny_model_dir)
    human = [{"chosen": f"\n\nHuman: {p}\n\nAssistant: I would rather not say",
              "rejected": f"\n\nHuman: {p}\n\nAssistant: sure, step {i} is easy"} for i, p in enumerate(PROMPTS)]
    (workdir / "human.jsonl").write_text("".join(json.dumps(r) + "\n" for r in human))

    def config(out: str, batch_size: int = 4) -> EvalConfig:
        return EvalConfig(pairs=workdir / "human.jsonl", constitution=workdir / "label.yaml", out=workdir / out,
                          model=str(tiny_model_dir), batch_size=batch_size, seed=3)

    run_label_eval(config("full"), engine=engine, progress=False)
    full = content(workdir / "full" / "labels.jsonl", LabelRecord)
    run_label_eval(config("other", batch_size=3), engine=engine, progress=False)
    assert content(workdir / "other" / "labels.jsonl", LabelRecord) != full

    (workdir / "crash").mkdir()
    kill_after(workdir / "full" / "labels.jsonl", workdir / "crash" / "labels.jsonl", rows=6)
    run_label_eval(config("crash"), engine=engine, progress=False)
    assert content(workdir / "crash" / "labels.jsonl", LabelRecord) == full
    assert len((workdir / "crash" / "labels.jsonl").read_text().splitlines()) == 10
