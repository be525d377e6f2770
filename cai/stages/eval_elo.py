"""Bradley-Terry strengths and Elo ratings of policies from soft pairwise judgements.

Each judged pair (a, b, p) says: the judge gives probability p that policy a's response is better
than policy b's (a soft label, both orders already averaged). The model is

    P(i beats j) = pi_i / (pi_i + pi_j) = 1 / (1 + 10^((E_j - E_i) / 400))
    E_i = 1000 + 400 * log10(pi_i),   normalised so the mean of E over the policies is 1000

and pi is the maximum-likelihood fit with fractional wins, found by the MM iteration of Hunter
(2004) that never leaves the feasible region:

    W_i   = sum of p over i's pairs as a, plus (1 - p) over its pairs as b   (soft wins)
    n_ij  = number of pairs between i and j
    pi_i <- W_i / sum_j n_ij / (pi_i + pi_j)

At the fit the score equations hold: W_i = sum_j n_ij * pi_i / (pi_i + pi_j) for every i.
A policy with no soft wins has no finite maximum-likelihood strength, so `prior` virtual pairs
judged 0.5 are added between every two policies (a small pull towards equal ratings; prior = 0
gives the plain fit). With two policies the fit is closed form: pi_a / pi_b = W_a / W_b.

Intervals: the prompts are resampled with replacement (all the pairs of a prompt go together,
since they share the prompt's difficulty), the ratings refitted, and the 2.5% and 97.5% quantiles
of each policy's rating kept. The generator is seeded, so the intervals are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from cai.errors import CaiError

BASE = 1000.0
SCALE = 400.0 / math.log(10.0)  # Elo points per natural-log unit of strength


class Judged(BaseModel):
    """One soft comparison: p = probability that policy `a` is better than policy `b`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    a: str
    b: str
    p: float
    group: str = ""  # the prompt it was asked on; bootstrap resamples whole groups


def fit_strengths(policies: Sequence[str], pairs: Sequence[Judged], prior: float = 1.0,
                  tol: float = 1e-12, max_iter: int = 100_000) -> dict[str, float]:
    """Log-strengths log(pi_i), centred to mean 0, by the MM iteration above."""
    index = {name: i for i, name in enumerate(policies)}
    k = len(policies)
    wins = np.zeros(k)
    counts = np.zeros((k, k))
    for j in pairs:
        a, b = index[j.a], index[j.b]
        wins[a] += j.p
        wins[b] += 1.0 - j.p
        counts[a, b] += 1
        counts[b, a] += 1
    if prior > 0:
        off = ~np.eye(k, dtype=bool)
        counts[off] += prior
        wins += prior * 0.5 * (k - 1)
    if np.any(wins <= 0):
        lost = [policies[i] for i in np.flatnonzero(wins <= 0)]
        raise CaiError(f"no soft wins for {', '.join(lost)}: its rating is unbounded; use a prior > 0")
    pi = np.ones(k)
    for _ in range(max_iter):
        new = wins / (counts / (pi[:, None] + pi[None, :])).sum(axis=1)
        new /= math.exp(np.log(new).mean())
        done = np.max(np.abs(np.log(new) - np.log(pi))) < tol
        pi = new
        if done:
            break
    logs = np.log(pi)
    return {name: float(logs[i] - logs.mean()) for name, i in index.items()}


def to_elo(log_strength: float) -> float:
    return BASE + SCALE * log_strength


def fit_elo(policies: Sequence[str], pairs: Sequence[Judged], prior: float = 1.0) -> dict[str, float]:
    """Elo rating per policy (mean 1000)."""
    return {k: to_elo(v) for k, v in fit_strengths(policies, pairs, prior).items()}


def bootstrap_elo(policies: Sequence[str], pairs: Sequence[Judged], rounds: int = 200, seed: int = 0,
                  prior: float = 1.0) -> dict[str, tuple[float, float]]:
    """95% interval of each policy's Elo from `rounds` refits on prompts resampled with replacement."""
    groups: dict[Hashable, list[Judged]] = {}
    for j in pairs:
        groups.setdefault(j.group, []).append(j)
    keys = list(groups)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {p: [] for p in policies}
    for _ in range(rounds):
        picked = rng.integers(0, len(keys), size=len(keys))
        sample = [j for g in picked for j in groups[keys[g]]]
        for name, elo in fit_elo(policies, sample, prior).items():
            draws[name].append(elo)
    return {name: (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))) for name, v in draws.items()}


class PolicyElo(BaseModel):
    """One policy on one axis: rating, 95% bootstrap interval, soft wins and comparisons."""

    model_config = ConfigDict(extra="forbid")

    policy: str
    elo: float
    low: float
    high: float
    soft_wins: float
    comparisons: int


def rate_policies(policies: Sequence[str], pairs: Sequence[Judged], rounds: int = 200, seed: int = 0,
                  prior: float = 1.0) -> list[PolicyElo]:
    """Ratings with intervals, in the order of `policies`."""
    elo = fit_elo(policies, pairs, prior)
    ci = bootstrap_elo(policies, pairs, rounds, seed, prior) if pairs else {p: (elo[p], elo[p]) for p in policies}
    out = []
    for name in policies:
        wins = sum(j.p for j in pairs if j.a == name) + sum(1 - j.p for j in pairs if j.b == name)
        n = sum(1 for j in pairs if name in (j.a, j.b))
        out.append(PolicyElo(policy=name, elo=elo[name], low=ci[name][0], high=ci[name][1], soft_wins=wins,
                             comparisons=n))
    return out
