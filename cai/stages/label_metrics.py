"""How trustworthy a set of AI labels is: position bias, confidence, entropy, principle agreement,
and against human labels, agreement and calibration (ECE and a reliability plot).

Conventions, used everywhere here:
- a probability `p` is the probability that response A is better;
- the verdict of `p` is A if p > 0.5, B if p < 0.5, and a tie at exactly 0.5;
- `p_ab` is judged with A shown first, `p_ba` with the two swapped (still about A). A judgement is
  position-biased when the two orders give different verdicts: the labeler followed the slot, not
  the response.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cai.stats import Share, share


def verdict(p: float) -> int:
    """+1 for A, -1 for B, 0 for a tie."""
    return (p > 0.5) - (p < 0.5)


def position_bias_rate(orders: list[tuple[float, float]]) -> float:
    """Share of (p_ab, p_ba) judgements whose verdict changes when the two responses swap slots."""
    if not orders:
        return 0.0
    return sum(verdict(ab) != verdict(ba) for ab, ba in orders) / len(orders)


def mean_confidence(probs: list[float]) -> float:
    """Mean of |2p - 1|: 0 for a coin flip, 1 for a certain label (max(p, 1-p) rescaled to [0, 1])."""
    return sum(abs(2 * p - 1) for p in probs) / len(probs) if probs else 0.0


def binary_entropy(p: float) -> float:
    """Entropy of a two-way label in bits: 1 at p = 0.5, 0 at p in {0, 1}."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def mean_entropy(probs: list[float]) -> float:
    return sum(binary_entropy(p) for p in probs) / len(probs) if probs else 0.0


def principle_agreement(per_pair: list[list[float]]) -> float | None:
    """Mean over pairs (with 2+ principles) of the share of principle pairs whose verdicts agree.

    None when no pair was judged under two principles.
    """
    scores = []
    for probs in per_pair:
        combos = list(itertools.combinations([verdict(p) for p in probs], 2))
        if combos:
            scores.append(sum(a == b for a, b in combos) / len(combos))
    return sum(scores) / len(scores) if scores else None


def human_agreement(probs: list[float], human_a: list[bool]) -> float:
    """Share of pairs where the label's verdict matches the human's; a tie scores 1/2 (a fair coin)."""
    if not probs:
        return 0.0
    hits = [0.5 if verdict(p) == 0 else float((verdict(p) > 0) == a) for p, a in zip(probs, human_a)]
    return sum(hits) / len(hits)


class CalibrationBin(BaseModel):
    """One bin of the reliability diagram: predictions in [lo, hi) (the last bin includes 1.0)."""

    model_config = ConfigDict(extra="forbid")

    lo: float
    hi: float
    count: int
    mean_prob: float | None  # mean predicted probability that A is better
    frequency: float | None  # share of these pairs where the human preferred A


def calibration_bins(probs: list[float], outcomes: list[bool], n_bins: int = 10) -> list[CalibrationBin]:
    """Equal-width bins over [0, 1] of the predicted P(A better) against how often A was the human's choice.

    Binning P(A) rather than max(p, 1-p) uses all bins, which works because the human-chosen
    response is put in slot A or B at random.
    """
    members: list[list[int]] = [[] for _ in range(n_bins)]
    for i, p in enumerate(probs):
        members[min(int(p * n_bins), n_bins - 1)].append(i)
    bins = []
    for b, idx in enumerate(members):
        bins.append(CalibrationBin(
            lo=b / n_bins, hi=(b + 1) / n_bins, count=len(idx),
            mean_prob=sum(probs[i] for i in idx) / len(idx) if idx else None,
            frequency=sum(outcomes[i] for i in idx) / len(idx) if idx else None,
        ))
    return bins


def expected_calibration_error(bins: list[CalibrationBin]) -> float:
    """Sum over bins of (share of pairs in the bin) * |mean predicted - observed frequency|."""
    total = sum(b.count for b in bins)
    if total == 0:
        return 0.0
    return sum(b.count / total * abs(b.mean_prob - b.frequency) for b in bins if b.count)  # type: ignore[operator]


def plot_calibration(bins: list[CalibrationBin], path: str | Path, title: str) -> Path:
    """Reliability diagram (observed vs predicted per bin, with the diagonal) over a count histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    filled = [b for b in bins if b.count]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.plot([b.mean_prob for b in filled], [b.frequency for b in filled], marker="o", label="labeler")
    top.set_ylabel("share where the human preferred A")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title(title, fontsize=10)
    top.legend(loc="lower right")
    width = bins[0].hi - bins[0].lo if bins else 0.1
    bottom.bar([b.lo for b in bins], [b.count for b in bins], width=width, align="edge", edgecolor="black")
    bottom.set_xlabel("predicted probability that A is better")
    bottom.set_ylabel("pairs")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class LabelMetrics(BaseModel):
    """Quality signals of a set of AI labels (no human labels needed)."""

    model_config = ConfigDict(extra="forbid")

    pairs: int
    judgements: int  # pair x principle
    position_bias_rate: float
    position_consistent_pairs: float  # share of pairs whose ensembled verdict is the same in both orders
    mean_confidence: float
    mean_entropy_bits: float
    principle_agreement: float | None
    label_prob_mean: float


def label_metrics(
    label_probs: list[float], per_principle: list[list[tuple[float, float]]], pair_consistent: list[bool]
) -> LabelMetrics:
    """Metrics of one run from each pair's label_prob, its per-principle (p_ab, p_ba) and its consistency flag."""
    orders = [o for pair in per_principle for o in pair]
    return LabelMetrics(
        pairs=len(label_probs),
        judgements=len(orders),
        position_bias_rate=position_bias_rate(orders),
        position_consistent_pairs=sum(pair_consistent) / len(pair_consistent) if pair_consistent else 0.0,
        mean_confidence=mean_confidence(label_probs),
        mean_entropy_bits=mean_entropy(label_probs),
        principle_agreement=principle_agreement([[(ab + ba) / 2 for ab, ba in pair] for pair in per_principle]),
        label_prob_mean=sum(label_probs) / len(label_probs) if label_probs else 0.0,
    )


class PrincipleAgreement(BaseModel):
    """One principle's own verdicts against the human labels: does asking this question help?"""

    model_config = ConfigDict(extra="forbid")

    principle_id: str
    agreement: Share = Field(description="pairs where the principle's verdict matches the human (a tie counts 1/2)")
    position_bias_rate: float = Field(description="share of its judgements whose verdict flips with the order")
    mean_confidence: float


def per_principle_agreement(judgements: list[tuple[str, float, float, bool]]) -> list[PrincipleAgreement]:
    """(principle id, p_ab, p_ba, human preferred A) per judgement -> one row per principle, by id.

    A principle's verdict is that of p = (p_ab + p_ba) / 2, scored as in `human_agreement`."""
    by_id: dict[str, list[tuple[float, float, bool]]] = {}
    for pid, ab, ba, human_a in judgements:
        by_id.setdefault(pid, []).append((ab, ba, human_a))
    out = []
    for pid in sorted(by_id):
        rows = by_id[pid]
        probs = [(ab + ba) / 2 for ab, ba, _ in rows]
        hits = human_agreement(probs, [h for _, _, h in rows]) * len(rows)
        out.append(PrincipleAgreement(
            principle_id=pid, agreement=share(hits, len(rows)),
            position_bias_rate=position_bias_rate([(ab, ba) for ab, ba, _ in rows]), mean_confidence=mean_confidence(probs),
        ))
    return out


class EvalMetrics(BaseModel):
    """AI labels against human labels."""

    model_config = ConfigDict(extra="forbid")

    agreement: float
    ece: float
    n_bins: int
    bins: list[CalibrationBin]
    human_in_slot_a: float  # share of pairs where the human-chosen response was shown as A
    labels: LabelMetrics
    per_principle: list[PrincipleAgreement] = Field(default_factory=list, description="agreement of each principle alone")
