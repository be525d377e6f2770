"""`cai label eval`: how well the AI labeler agrees with human preference labels.

Each human pair is shown with the human-chosen response in slot A or B by a seeded coin per pair,
so a labeler that always prefers one slot scores 50%, and calibration can be read over the whole
[0, 1] range of P(A better). Writes DIR/labels.jsonl (resumable), DIR/metrics.json and
DIR/calibration.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from cai.engines.base import Engine, engine_fingerprint
from cai.hashing import record_id, sha256_of
from cai.stages.label import LabelerSettings, LabelRecord, label_into, load_labeler, metrics_of
from cai.stages.label_metrics import (
    EvalMetrics,
    calibration_bins,
    expected_calibration_error,
    human_agreement,
    per_principle_agreement,
    plot_calibration,
)
from cai.stages.pairs import HumanPair, Pair, read_human_pairs, row_seed
from cai.store import JsonlStore

N_BINS = 10


class EvalConfig(LabelerSettings):
    """Settings of `cai label eval`."""

    pairs: Path = Field(description="human pairs: HH-RLHF transcripts or prompt/chosen/rejected (.jsonl, .jsonl.gz)")
    out: Path = Field(description="output directory")
    skip_malformed: bool = Field(False, description="skip (and count) rows that cannot be parsed instead of stopping")

    def fingerprint(self, *args: Any) -> dict[str, Any]:
        out = super().fingerprint(*args)
        out["eval"] = "human-slot-coin"
        return out


def human_slot(seed: int, pair: HumanPair) -> Literal["A", "B"]:
    """Where the human-chosen response is shown: a fair coin keyed by the run seed and the pair's content."""
    return "A" if row_seed(seed, "human-slot", pair.model_dump(exclude={"line"}, mode="json")) % 2 == 0 else "B"


def to_pair(pair: HumanPair, slot: Literal["A", "B"]) -> Pair:
    a, b = (pair.chosen, pair.rejected) if slot == "A" else (pair.rejected, pair.chosen)
    return Pair(prompt=pair.prompt, response_a=a, response_b=b, source_index=pair.line)


class EvalSummary(BaseModel):
    """What an eval run did (saved with the metrics in DIR/metrics.json)."""

    model_config = ConfigDict(extra="forbid")

    pairs_file: str
    pairs_file_sha256: str
    rows_total: int
    rows_written: int
    rows_skipped: int
    malformed_skipped: list[str]
    model: str
    engine: str
    mode: str
    principles: list[str]
    wall_seconds: float
    seconds_per_pair: float | None
    metrics: EvalMetrics

    def render(self) -> str:
        m = self.metrics
        per_pair = "n/a" if self.seconds_per_pair is None else f"{self.seconds_per_pair:.2f}s"
        return (
            f"{self.rows_total} human pairs ({self.rows_written} labelled now, {self.rows_skipped} resumed, "
            f"{len(self.malformed_skipped)} malformed skipped) with {self.model} ({self.mode})\n"
            f"agreement with humans {m.agreement:.3f}; position-bias rate {m.labels.position_bias_rate:.3f}; "
            f"ECE ({m.n_bins} bins) {m.ece:.3f}; mean confidence {m.labels.mean_confidence:.3f}\n"
            f"wall {self.wall_seconds:.1f}s ({per_pair} per pair)"
            + "".join(f"\n  {p.principle_id:<24} agreement {p.agreement.rate:.3f} [{p.agreement.low:.3f}, "
                      f"{p.agreement.high:.3f}] over {p.agreement.n} pairs; position-bias rate {p.position_bias_rate:.3f}"
                      for p in m.per_principle)
        )


def eval_metrics(records: list[LabelRecord]) -> EvalMetrics:
    probs = [r.label_prob for r in records]
    human_a = [r.human_choice == "A" for r in records]
    bins = calibration_bins(probs, human_a, N_BINS)
    return EvalMetrics(
        agreement=human_agreement(probs, human_a), ece=expected_calibration_error(bins), n_bins=N_BINS, bins=bins,
        human_in_slot_a=sum(human_a) / len(human_a) if human_a else 0.0, labels=metrics_of(records),
        per_principle=per_principle_agreement([(x.principle_id, x.p_ab, x.p_ba, r.human_choice == "A")
                                               for r in records for x in r.principles]),
    )


def run_label_eval(config: EvalConfig, engine: Engine | None = None, progress: bool = True) -> EvalSummary:
    """Label human pairs (resuming DIR/labels.jsonl), then write DIR/metrics.json and DIR/calibration.png."""
    human, malformed = read_human_pairs(config.pairs, limit=config.limit, skip_malformed=config.skip_malformed)
    labeler = load_labeler(config, engine)
    fingerprint = {**config.fingerprint(labeler.constitution, labeler.templates, labeler.engine.model_id),
                   **engine_fingerprint(labeler.engine)}
    config_hash = sha256_of(fingerprint)[:16]
    todo: list[tuple[str, Pair, dict[str, Any]]] = []
    for h in human:
        slot = human_slot(config.seed, h)
        pair = to_pair(h, slot)
        todo.append((record_id(pair.key(), slot, config_hash), pair, {"human_choice": slot}))
    run_ids = {rid for rid, _, _ in todo}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    store = JsonlStore(out / "labels.jsonl", LabelRecord, stage="label-eval", config=fingerprint, force=config.force)
    skipped = len(run_ids & store.ids)
    start = time.perf_counter()
    with store:
        bar = tqdm(total=len(run_ids), initial=skipped, desc="label eval", unit="pair", disable=not progress)
        written = label_into(labeler, store, todo, "human", config.batch_size, bar)
        bar.close()
        records = [r for r in store.records() if r.id in run_ids]
    wall = time.perf_counter() - start
    metrics = eval_metrics(records)
    title = f"{Path(labeler.engine.model_id).name} ({config.mode})\n{len(records)} pairs, ECE {metrics.ece:.3f}"
    plot_calibration(metrics.bins, out / "calibration.png", title)
    summary = EvalSummary(
        pairs_file=str(config.pairs), pairs_file_sha256=sha256_of(Path(config.pairs).read_bytes()),
        rows_total=len(records), rows_written=written, rows_skipped=skipped,
        malformed_skipped=[str(e) for e in malformed], model=labeler.engine.model_id, engine=labeler.engine.name,
        mode=config.mode, principles=[p.id for p in labeler.principles], wall_seconds=round(wall, 3),
        seconds_per_pair=round(wall / written, 3) if written else None, metrics=metrics,
    )
    (out / "metrics.json").write_text(json.dumps(summary.model_dump(mode="json"), indent=2))
    return summary
