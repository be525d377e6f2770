"""Bradley-Terry / Elo fit: the closed form for two policies, the score equations for three, a known
ordering recovered from synthetic judgements, and bootstrap intervals that shrink with more prompts."""

from __future__ import annotations

import math
import random

import pytest

from cai.errors import CaiError
from cai.stages.eval_elo import Judged, bootstrap_elo, fit_elo, fit_strengths, rate_policies


def test_two_policies_match_the_closed_form() -> None:
    pairs = [Judged(a="x", b="y", p=p) for p in (0.8, 0.6, 0.7, 0.9)]  # soft wins: x 3.0, y 1.0
    elo = fit_elo(["x", "y"], pairs, prior=0)
    assert elo["x"] - elo["y"] == pytest.approx(400 * math.log10(3.0), abs=1e-6)  # 190.85 points
    assert (elo["x"] + elo["y"]) / 2 == pytest.approx(1000)
    # the prior adds one virtual 0.5 pair: (3 + 0.5) / (1 + 0.5)
    elo = fit_elo(["x", "y"], pairs, prior=1)
    assert elo["x"] - elo["y"] == pytest.approx(400 * math.log10(3.5 / 1.5), abs=1e-6)
    # which side a policy is on does not matter: (y, x, 1 - p) is the same judgement
    flipped = [Judged(a="y", b="x", p=1 - j.p) for j in pairs]
    assert fit_elo(["x", "y"], flipped, prior=0) == pytest.approx(fit_elo(["x", "y"], pairs, prior=0))


def test_three_policies_satisfy_the_score_equations() -> None:
    pairs = [Judged(a="a", b="b", p=0.7), Judged(a="a", b="b", p=0.4), Judged(a="b", b="c", p=0.9),
             Judged(a="c", b="a", p=0.35), Judged(a="a", b="c", p=0.6)]
    s = fit_strengths(["a", "b", "c"], pairs, prior=0)
    pi = {k: math.exp(v) for k, v in s.items()}
    # hand: W_a = 0.7 + 0.4 + 0.65 + 0.6 = 2.35; W_b = 0.3 + 0.6 + 0.9 = 1.8; W_c = 0.1 + 0.35 + 0.4 = 0.85
    wins = {"a": 2.35, "b": 1.8, "c": 0.85}
    n = {("a", "b"): 2, ("b", "c"): 1, ("a", "c"): 2}
    for i in "abc":
        expected = sum(c * pi[i] / (pi[i] + pi[j]) for (x, y), c in n.items() for j in (y if x == i else x,)
                       if i in (x, y))
        assert expected == pytest.approx(wins[i], abs=1e-8)
    assert sum(s.values()) == pytest.approx(0, abs=1e-12)


def test_known_ordering_is_recovered_from_synthetic_judgements() -> None:
    true = {"weak": -1.0, "mid": 0.0, "strong": 1.2}
    rng = random.Random(0)
    pairs = []
    for prompt in range(300):
        a, b = rng.sample(list(true), 2)
        p_true = 1 / (1 + math.exp(true[b] - true[a]))
        p = min(max(p_true + rng.gauss(0, 0.1), 0.0), 1.0)  # a noisy soft judge around the truth
        pairs.append(Judged(a=a, b=b, p=p, group=str(prompt)))
    s = fit_strengths(list(true), pairs, prior=0)
    assert sorted(s, key=s.get) == ["weak", "mid", "strong"]
    assert s["strong"] - s["weak"] == pytest.approx(2.2, abs=0.35)


def synthetic(prompts: int, seed: int) -> list[Judged]:
    rng = random.Random(seed)
    return [Judged(a=a, b=b, p=1.0 if rng.random() < (0.7 if a == "x" else 0.5) else 0.0, group=str(i))
            for i in range(prompts) for a, b in (("x", "y"), ("y", "z"), ("x", "z"))]


def test_bootstrap_intervals_shrink_with_more_prompts_and_are_seeded() -> None:
    small, large = synthetic(20, 1), synthetic(400, 1)
    names = ["x", "y", "z"]
    width = {n: {k: hi - lo for k, (lo, hi) in bootstrap_elo(names, pairs, rounds=100, seed=0).items()}
             for n, pairs in (("small", small), ("large", large))}
    for k in names:
        assert width["large"][k] < width["small"][k] / 2.5  # ~sqrt(20) narrower
    assert bootstrap_elo(names, small, rounds=50, seed=3) == bootstrap_elo(names, small, rounds=50, seed=3)
    rated = rate_policies(names, large, rounds=50)
    assert all(r.low <= r.elo <= r.high for r in rated)
    assert [r.comparisons for r in rated] == [800, 800, 800]


def test_a_policy_without_wins_needs_the_prior() -> None:
    pairs = [Judged(a="x", b="y", p=1.0)] * 3
    with pytest.raises(CaiError, match="no soft wins for y"):
        fit_elo(["x", "y"], pairs, prior=0)
    elo = fit_elo(["x", "y"], pairs, prior=1)
    assert elo["x"] - elo["y"] == pytest.approx(400 * math.log10(3.5 / 0.5), abs=1e-6)
