"""The prompts of each PPO step: a weighted mix of prompt files, a pure function of (seed, step), so
a resumed run needs no data position beyond the step."""

from __future__ import annotations

import math

from cai.train.data import epoch_order
from cai.train.ppo_config import PromptSource


def load_prompt_sources(sources: list[PromptSource]) -> list[list[list[dict[str, str]]]]:
    """Each source's prompts as conversations ending with the user turn to answer."""
    from cai.conversation import as_dicts
    from cai.stages.inputs import load_prompts
    from cai.stages.pairs import read_human_pairs

    out = []
    for src in sources:
        if src.kind == "prompts":
            convs = load_prompts(src.file, limit=src.limit)
        else:
            convs = [p.prompt for p in read_human_pairs(src.file, limit=src.limit)[0]]
        out.append([as_dicts(c) for c in convs])
    return out


def apportion(total: int, weights: list[float]) -> list[int]:
    """Split `total` into integer shares proportional to weights (largest remainder, ties to the first)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


class PromptSchedule:
    """The prompts of each step: source j gives counts[j] prompts per step, walking through a fresh
    seeded permutation of its file each epoch. A pure function of (seed, step): resume needs no
    data position beyond the step."""

    def __init__(self, sources: list[list[list[dict[str, str]]]], weights: list[float], per_step: int, seed: int):
        self.sources, self.seed = sources, seed
        self.counts = apportion(per_step, weights)
        self._orders: dict[tuple[int, int], list[int]] = {}

    def _index(self, source: int, t: int) -> int:
        n = len(self.sources[source])
        epoch, i = divmod(t, n)
        key = (source, epoch)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source}
            self._orders[key] = epoch_order(n, self.seed + 7919 * source, epoch)
        return self._orders[key][i]

    def step(self, step: int) -> list[tuple[int, list[dict[str, str]]]]:
        """(source index, conversation) of every prompt of a step, sources in config order."""
        out = []
        for j, k in enumerate(self.counts):
            out += [(j, self.sources[j][self._index(j, t)]) for t in range(step * k, (step + 1) * k)]
        return out
