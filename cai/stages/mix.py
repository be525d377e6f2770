"""Mix AI-labelled harmlessness pairs with human helpfulness pairs into one reward-model dataset.

The mix is declared, not incidental: either a ratio (share of AI rows; as many rows as the inputs
allow at that ratio) or exact counts. Rows are drawn and shuffled with one seed, and the
train/test split is made within each source, so both splits keep the declared ratio. Output:
DIR/train.jsonl, DIR/test.jsonl (PreferenceRow) and DIR/mix.json (what went in, with sha256).

Before drawing, AI rows can be filtered: `min_confidence` X drops an AI pair whose label_prob
(oriented, >= 0.5) is below 0.5 + X, i.e. a near coin-flip label that a trainer ignoring
label_prob would learn as certain; `drop_flags` drops rows carrying a listed flag
(cai.stages.flag_filter). Both are counted in mix.json under `dropped`.

The three files are written to temporary names and renamed into place only when all are complete,
so a crash or a full disk never leaves a torn file, and a failed write leaves the previous mix.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai.conversation import Message
from cai.errors import CaiError, InputError
from cai.hashing import record_id, sha256_of
from cai.stages.flag_filter import FLAG_NAMES, count_key, drop_reason, row_flags
from cai.stages.pairs import PreferenceRow, human_pair_from_row, iter_rows, read_human_pairs
from cai.store import unique_ids


class MixConfig(BaseModel):
    """Settings of `cai mix`."""

    model_config = ConfigDict(extra="forbid")

    ai: list[Path] = Field(min_length=1, description="`cai label` outputs (or prompt/chosen/rejected[/label_prob] rows)")
    human: list[Path] = Field(min_length=1, description="human pairs: HH-RLHF transcripts or prompt/chosen/rejected")
    out: Path = Field(description="output directory")
    ratio: float | None = Field(None, ge=0.0, le=1.0, description="share of AI rows in the mix (default 0.5)")
    ai_count: int | None = Field(None, ge=0)
    human_count: int | None = Field(None, ge=0)
    test_size: float = Field(0.1, ge=0.0, lt=1.0, description="share of each source held out for test")
    seed: int = 0
    ai_source: str = "ai-harmless"
    human_source: str = "human-helpful"
    skip_malformed: bool = Field(False, description="skip human rows that cannot be parsed instead of stopping")
    min_confidence: float = Field(0.0, ge=0.0, le=0.5, description="drop AI pairs with label_prob < 0.5 + this")
    drop_flags: list[str] = Field(default_factory=list, description=f"drop rows flagged with any of: {', '.join(FLAG_NAMES)}")

    @model_validator(mode="after")
    def _known_flags(self) -> MixConfig:
        unknown = [f for f in self.drop_flags if f not in FLAG_NAMES]
        if unknown:
            raise ValueError(f"unknown flag {unknown[0]!r} in drop_flags; the flags are: {', '.join(FLAG_NAMES)}")
        return self

    @model_validator(mode="after")
    def _ratio_or_counts(self) -> MixConfig:
        counts = (self.ai_count is not None, self.human_count is not None)
        if any(counts) and self.ratio is not None:
            raise ValueError("give either ratio or ai_count + human_count, not both")
        if any(counts) and not all(counts):
            raise ValueError("ai_count and human_count go together")
        return self


def ai_row(row: dict[str, Any], path: str, line: int, source: str) -> PreferenceRow:
    """A `cai label` row (response_a/response_b + label_prob = P(A better)) or a preference row, oriented so
    that chosen is the likelier better one and label_prob = P(chosen better) >= 0.5."""
    if "response_a" in row:
        for field in ("prompt", "response_b", "label_prob"):
            if field not in row:
                raise InputError(path, f"missing '{field}'", line=line, field=field)
        p = row["label_prob"]
        if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise InputError(path, f"must be a number in [0, 1], got {p!r}", line=line, field="label_prob")
        pair = human_pair_from_row(
            {"prompt": row["prompt"], "chosen": row["response_a"], "rejected": row["response_b"], "label_prob": p},
            path, line,
        )
    else:
        pair = human_pair_from_row(row, path, line)
    chosen, rejected, p = pair.chosen, pair.rejected, pair.label_prob
    if p < 0.5:
        chosen, rejected, p = rejected, chosen, 1.0 - p
    rid = row["id"] if isinstance(row.get("id"), str) else record_id(
        [m.model_dump() for m in pair.prompt], chosen, rejected
    )
    return PreferenceRow(id=rid, prompt=pair.prompt, chosen=[Message(role="assistant", content=chosen)],
                         rejected=[Message(role="assistant", content=rejected)], label_prob=p, source=source)


LOW_CONFIDENCE = "low_confidence"


def read_ai_rows(path: Path, config: MixConfig) -> tuple[list[PreferenceRow], list[str]]:
    """The AI rows of one file that pass the filters, and the reason each other row was dropped."""
    rows: list[PreferenceRow] = []
    dropped: list[str] = []
    seen = 0
    for line, raw in unique_ids(iter_rows(path), path):
        seen += 1
        row = ai_row(raw, str(path), line, config.ai_source)
        flag = drop_reason(row_flags(raw), tuple(config.drop_flags))
        if flag is not None:
            dropped.append(count_key(flag))
        elif row.label_prob - 0.5 < config.min_confidence:
            dropped.append(LOW_CONFIDENCE)
        else:
            rows.append(row)
    if not seen:
        raise InputError(str(path), "no rows in file")
    return rows, dropped


def read_human_rows(path: Path, source: str, skip_malformed: bool) -> tuple[list[PreferenceRow], int]:
    pairs, malformed = read_human_pairs(path, skip_malformed=skip_malformed)
    rows = []
    for h in pairs:
        chosen, rejected, p = (h.chosen, h.rejected, h.label_prob) if h.label_prob >= 0.5 else (
            h.rejected, h.chosen, 1.0 - h.label_prob)
        rows.append(PreferenceRow(
            id=record_id([m.model_dump() for m in h.prompt], chosen, rejected), prompt=h.prompt,
            chosen=[Message(role="assistant", content=chosen)], rejected=[Message(role="assistant", content=rejected)],
            label_prob=p, source=source,
        ))
    return rows, len(malformed)


def mix_counts(n_ai: int, n_human: int, ratio: float) -> tuple[int, int]:
    """The largest mix the inputs allow at `ratio`: the biggest total N whose split ai = ratio * N rounded to
    the nearest row, human = N - ai, fits in what is available. Totals where ratio * N is exactly halfway
    (an odd N at 0.5) are passed over, so a 0.5 mix is always balanced."""
    if ratio == 0.0:
        return 0, n_human
    if ratio == 1.0:
        return n_ai, 0
    total = min(math.floor(n_ai / ratio), math.floor(n_human / (1.0 - ratio))) + 2
    while total > 0:
        exact = ratio * total
        ai = math.floor(exact + 0.5)
        if abs(exact - math.floor(exact) - 0.5) > 1e-9 and ai <= n_ai and total - ai <= n_human:
            return ai, total - ai
        total -= 1
    return 0, 0


class MixSummary(BaseModel):
    """DIR/mix.json: the recipe of the mix, enough to rebuild it."""

    model_config = ConfigDict(extra="forbid")

    seed: int
    ratio: float | None
    requested: dict[str, int | None]
    test_size: float
    inputs: list[dict[str, Any]]  # path, sha256, source, rows available
    counts: dict[str, dict[str, int]]  # split -> source -> rows
    malformed_skipped: int
    dropped: dict[str, int] = Field(default_factory=dict, description="AI rows left out, by reason")

    def render(self) -> str:
        lines = [f"{split}: " + ", ".join(f"{src}={n}" for src, n in by.items()) for split, by in self.counts.items()]
        if self.dropped:
            lines.append("dropped AI rows: " + ", ".join(f"{why}={n}" for why, n in self.dropped.items()))
        return "\n".join(lines)


def _split(rows: list[PreferenceRow], test_size: float) -> tuple[list[PreferenceRow], list[PreferenceRow]]:
    n_test = round(test_size * len(rows))
    return rows[n_test:], rows[:n_test]


def run_mix(config: MixConfig) -> MixSummary:
    """Read, filter, draw, shuffle, split and write the mix."""
    check_out_dir(Path(config.out))
    inputs: list[dict[str, Any]] = []
    ai: list[PreferenceRow] = []
    human: list[PreferenceRow] = []
    malformed = 0
    reasons: list[str] = []
    for path in config.ai:
        rows, why = read_ai_rows(path, config)
        ai += rows
        reasons += why
        inputs.append({"path": str(path), "sha256": sha256_of(path.read_bytes()), "source": config.ai_source,
                       "rows": len(rows)})
    for path in config.human:
        rows, bad = read_human_rows(path, config.human_source, config.skip_malformed)
        human += rows
        malformed += bad
        inputs.append({"path": str(path), "sha256": sha256_of(path.read_bytes()), "source": config.human_source,
                       "rows": len(rows)})
    if config.ai_count is not None and config.human_count is not None:
        for name, want, have in (("ai", config.ai_count, len(ai)), ("human", config.human_count, len(human))):
            if want > have:
                raise CaiError(f"--{name}-count {want} asks for more rows than the {name} inputs have ({have})")
        n_ai, n_human = config.ai_count, config.human_count
        ratio = None
    else:
        ratio = 0.5 if config.ratio is None else config.ratio
        n_ai, n_human = mix_counts(len(ai), len(human), ratio)
    if n_ai + n_human == 0:
        raise CaiError("the mix would be empty: check --ratio and the input files")
    rng = random.Random(config.seed)
    rng.shuffle(ai)
    rng.shuffle(human)
    ai_train, ai_test = _split(ai[:n_ai], config.test_size)
    human_train, human_test = _split(human[:n_human], config.test_size)
    train, test = ai_train + human_train, ai_test + human_test
    rng.shuffle(train)
    rng.shuffle(test)
    summary = MixSummary(
        seed=config.seed, ratio=ratio, requested={"ai_count": config.ai_count, "human_count": config.human_count},
        test_size=config.test_size, inputs=inputs,
        counts={
            "train": {config.ai_source: len(ai_train), config.human_source: len(human_train)},
            "test": {config.ai_source: len(ai_test), config.human_source: len(human_test)},
        },
        malformed_skipped=malformed,
        dropped=dict(sorted(Counter(reasons).items())),
    )
    write_mix(Path(config.out), {
        "train.jsonl": "".join(row.model_dump_json() + "\n" for row in train),
        "test.jsonl": "".join(row.model_dump_json() + "\n" for row in test),
        "mix.json": json.dumps(summary.model_dump(mode="json"), indent=2),
    })
    return summary


def check_out_dir(out: Path) -> None:
    """`out` must be a directory or not exist yet: a mix is three files, and a file there is the user's."""
    if out.exists() and not out.is_dir():
        raise CaiError(f"--out {out} is an existing file, but cai mix writes a directory (train.jsonl, "
                       "test.jsonl, mix.json); choose a directory path")


def write_mix(out: Path, files: dict[str, str]) -> None:
    """Write every file to a temporary name (fsynced), then rename them all into place; on any error the
    temporary files are removed and the previous contents of `out` are left as they were."""
    out.mkdir(parents=True, exist_ok=True)
    temps = {name: out / f".{name}.tmp-{os.getpid()}" for name in files}
    try:
        for name, text in files.items():
            with temps[name].open("w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for name, tmp in temps.items():
            os.replace(tmp, out / name)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
