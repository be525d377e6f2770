"""Revisions that copy the few-shot dialogues: a step is flagged `copied_few_shot` when its revision
shares a run of at least `MIN_WORDS` consecutive words with the few-shot prompts that the row's own
conversation and earlier responses do not contain.

Small models often paste whole sentences of a worked example into an unrelated answer; such a
revision reads fluently but is wrong data. Words are compared lower-cased with punctuation
dropped, so reformatting does not hide a copy. Runs the row itself supplies are excluded, so a user
who quotes a few-shot prompt, or a response that already said it, is not flagged for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from cai.prompts import FewShotSet

MIN_WORDS = 8
_WORD = re.compile(r"\w+")

NGram = tuple[str, ...]


def word_ngrams(text: str, n: int = MIN_WORDS) -> set[NGram]:
    """Every run of `n` consecutive words of `text` (lower-cased, punctuation dropped)."""
    words = _WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def few_shot_texts(few_shot: FewShotSet) -> list[str]:
    """Every text of the few-shot dialogues a model sees before the row's own conversation."""
    return [text for ex in few_shot.examples for text in ex.model_dump().values()]


class CopyCheck:
    """The few-shot n-grams, computed once per run; `copied` tests one revision against them."""

    def __init__(self, few_shot_texts: Iterable[str], n: int = MIN_WORDS):
        self.n = n
        self.ngrams: set[NGram] = set().union(*(word_ngrams(t, n) for t in few_shot_texts))

    def copied(self, revision: str, own_texts: Iterable[str] = ()) -> bool:
        """True when `revision` shares an n-gram with the few-shot texts that none of `own_texts`
        (the row's conversation and earlier responses) has."""
        shared = word_ngrams(revision, self.n) & self.ngrams
        if not shared:
            return False
        for text in own_texts:
            shared -= word_ngrams(text, self.n)
            if not shared:
                return False
        return True
