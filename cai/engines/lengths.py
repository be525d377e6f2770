"""Fitting prompts into a model's context, one rule for both engines.

A prompt of n tokens with r tokens reserved after it (max_new_tokens when generating, the choice
when scoring) fits when n + r <= window, where window = the model's context length (capped by the
engine's `max_length` on prompts, if set). A prompt that does not fit is
- "truncate" (default): left-truncated: its first token (BOS, which models are trained to see) and
  its last `window - r - 1` tokens are kept, so the turn being answered and the assistant cue
  survive and the oldest text (few-shot examples, early turns) goes; flag `prompt_too_long`;
- "skip": not run at all; flag `prompt_too_long`.
A prompt of zero tokens is skipped with flag `empty_prompt` (nothing to continue from).
Rows are fitted one by one, so one bad row never fails a batch.

A text so long that it cannot fit whatever the tokenizer (over MAX_CHARS_PER_TOKEN characters per
token of budget, twice over) is tokenized from its tail only: a 5 MB prompt costs a tokenization
of a few hundred kB, not minutes and gigabytes. The kept tokens (BOS + the last ones) are those of the
whole text except, rarely, right at the cut, which left-truncation drops anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from cai.engines.base import RowFlag

log = logging.getLogger(__name__)

# No real tokenizer averages this many characters per token over a long text.
MAX_CHARS_PER_TOKEN = 32

Overlong = Literal["truncate", "skip"]
OVERLONG_RULES = ("truncate", "skip")


def context_window(config: Any) -> int | None:
    """The model's context length from its transformers config (text config for multimodal ones)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_budget(window: int | None, max_length: int | None, reserve: int) -> int | None:
    """Most prompt tokens that leave `reserve` tokens of room (None: no limit known)."""
    limits = [x for x in (None if window is None else window - reserve, max_length) if x is not None]
    return min(limits) if limits else None


def encode_within(encode: Callable[[str], list[int]], text: str, budget: int | None) -> tuple[str, list[int]]:
    """(text, encode(text)); for a text that cannot fit `budget` tokens, (its tail, first token of
    the text + encode(tail)) when that is over budget: what `fit_prompt` keeps of it (the first and
    the last tokens) is what it would keep of the whole text, and the row is cut and flagged the same."""
    if budget is not None and len(text) > 2 * MAX_CHARS_PER_TOKEN * max(budget, 1):
        tail = text[-MAX_CHARS_PER_TOKEN * max(budget, 1):]
        ids = encode(text[:MAX_CHARS_PER_TOKEN])[:1] + encode(tail)
        if len(ids) > budget + 1:
            return tail, ids
    return text, encode(text)


def fit_prompt(ids: list[int], budget: int | None, overlong: Overlong = "truncate"
               ) -> tuple[list[int] | None, RowFlag | None]:
    """(ids to run or None to skip, flag) for one prompt under `budget` tokens (rule: module doc)."""
    if not ids:
        return None, "empty_prompt"
    if budget is None or len(ids) <= budget:
        return ids, None
    if overlong == "skip" or budget < 2:
        log.warning("prompt over %d tokens (%d counted) skipped", max(budget, 0), len(ids))
        return None, "prompt_too_long"
    log.warning("prompt over %d tokens (%d counted) cut to its first and last %d tokens", budget, len(ids), budget - 1)
    return ids[:1] + ids[len(ids) - budget + 1:], "prompt_too_long"


def split_joint(prompt_ids: list[int], joint_ids: list[int]) -> tuple[list[int], list[int]]:
    """(context, continuation) of prompt + choice tokenized together, split at the prompt's token
    length (the lm-eval-harness rule). When the choice merged wholly into the prompt's last token,
    the split moves back one token so there is always something to score."""
    cut = min(len(prompt_ids), max(len(joint_ids) - 1, 0))
    return joint_ids[:cut], joint_ids[cut:]


class ScoringPlan:
    """What choice scoring runs: for each (prompt i, choice j) with a non-empty choice, the fitted
    context and the continuation to score; per prompt, its flag and whether it is skipped."""

    def __init__(self, n_prompts: int):
        self.jobs: list[tuple[int, int, list[int], list[int]]] = []  # (i, j, context, continuation)
        self.flags: list[RowFlag | None] = [None] * n_prompts
        self.skipped: set[int] = set()


def plan_scoring(encode: Any, prompts: list[str], choices: list[list[str]], window: int | None,
                 max_length: int | None, overlong: Overlong = "truncate") -> ScoringPlan:
    """Tokenize every prompt + choice together, split at the prompt length, fit each context into
    the window with room for its continuation. `encode(text)` gives ids as for a prompt (with BOS).
    An empty choice scores 0.0 and is not run; a prompt with a skipped choice is skipped whole."""
    plan = ScoringPlan(len(prompts))
    for i, (prompt, cs) in enumerate(zip(prompts, choices)):
        text, prompt_ids = encode_within(encode, prompt, prompt_budget(window, max_length, 0))
        head = prompt_ids[:1] if len(text) < len(prompt) else []  # the text's first token, when only its tail was read
        if not prompt_ids:
            plan.flags[i] = "empty_prompt"
            plan.skipped.add(i)
            continue
        row: list[tuple[int, int, list[int], list[int]]] = []
        for j, choice in enumerate(cs):
            if not choice:
                continue
            context, continuation = split_joint(prompt_ids, head + encode(text + choice))
            fitted, flag = fit_prompt(context, prompt_budget(window, max_length, len(continuation)), overlong)
            plan.flags[i] = plan.flags[i] or flag
            if fitted is None:
                plan.skipped.add(i)
                break
            row.append((i, j, fitted, continuation))
        if i not in plan.skipped:
            plan.jobs.extend(row)
    return plan
