"""Small interval estimates shared by the evaluation code.

Wilson score interval for a share k/n at confidence z (z = 1.96 for 95%):

    centre = (k/n + z^2/(2n)) / (1 + z^2/n)
    half   = z / (1 + z^2/n) * sqrt(k/n * (1 - k/n) / n + z^2 / (4 n^2))

It stays inside [0, 1] and is honest at small n and at shares near 0 or 1, where the normal
approximation collapses to a zero-width interval; that is the regime of a few dozen judged prompts.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

Z95 = 1.959963984540054


class Share(BaseModel):
    """k of n, the share k/n and its 95% Wilson interval (all None when n = 0)."""

    model_config = ConfigDict(extra="forbid")

    k: float
    n: int
    rate: float | None
    low: float | None
    high: float | None


def wilson_interval(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials (k may be fractional: soft counts)."""
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return max(0.0, centre - half), min(1.0, centre + half)


def share(k: float, n: int) -> Share:
    if n == 0:
        return Share(k=k, n=0, rate=None, low=None, high=None)
    low, high = wilson_interval(k, n)
    return Share(k=k, n=n, rate=k / n, low=low, high=high)
