"""cai.engines.lengths: the one prompt-fitting rule both engines use, checked by hand."""

from __future__ import annotations

import pytest
from tiny import build_tokenizer

from cai.engines.lengths import encode_within, fit_prompt, plan_scoring, prompt_budget, split_joint


def test_fit_rules():
    assert fit_prompt([], 10) == (None, "empty_prompt")
    assert fit_prompt([1, 2, 3], 3) == ([1, 2, 3], None) and fit_prompt([1, 2, 3], None) == ([1, 2, 3], None)
    assert fit_prompt([1, 2, 3, 4, 5, 6], 4) == ([1, 4, 5, 6], "prompt_too_long")  # first token + the end
    assert fit_prompt([1, 2, 3, 4, 5, 6], 4, "skip") == (None, "prompt_too_long")
    assert fit_prompt([1, 2, 3], 1) == (None, "prompt_too_long")  # no room for BOS + one token
    assert prompt_budget(1024, None, 128) == 896 and prompt_budget(1024, 100, 128) == 100
    assert prompt_budget(None, None, 5) is None and prompt_budget(None, 50, 5) == 50


def test_split_at_the_prompt_length_and_never_empty():
    assert split_joint([1, 2, 3], [1, 2, 3, 4, 5]) == ([1, 2, 3], [4, 5])
    assert split_joint([1, 2, 3], [1, 2, 9, 5]) == ([1, 2, 9], [5])  # a merge across the boundary
    assert split_joint([1, 2, 3], [1, 2, 9]) == ([1, 2], [9])  # the choice merged wholly into the prompt


def test_scoring_plan_fits_each_context_with_room_for_its_choice():
    encode = lambda text: [ord(c) for c in text]
    plan = plan_scoring(encode, ["abcdefgh", "", "xy"], [["12", "3"], ["1"], ["", "z"]], window=8, max_length=None)
    assert plan.flags == ["prompt_too_long", "empty_prompt", None] and plan.skipped == {1}
    assert [(i, j, "".join(map(chr, c)), "".join(map(chr, n))) for i, j, c, n in plan.jobs] == [
        (0, 0, "adefgh", "12"), (0, 1, "acdefgh", "3"), (2, 1, "xy", "z")]


def test_a_huge_text_is_tokenized_from_its_tail_with_the_same_kept_tokens():
    tok = build_tokenizer()
    encode_calls: list[int] = []

    def encode(text: str) -> list[int]:
        encode_calls.append(len(text))
        return tok(text)["input_ids"]

    text = "".join(f"Human: question {i} about bread? Assistant: answer {i}. " for i in range(4000))
    full = fit_prompt(tok(text)["input_ids"], 300)
    _, ids = encode_within(encode, text, 300)
    assert fit_prompt(ids, 300) == full and full[1] == "prompt_too_long"
    assert max(encode_calls) < len(text) / 10  # only the tail was tokenized
    plan = plan_scoring(encode, [text], [[" yes", " no no"]], window=301, max_length=None)
    for (_, _, context, continuation), choice in zip(plan.jobs, [" yes", " no no"]):
        whole = split_joint(tok(text)["input_ids"], tok(text + choice)["input_ids"])
        assert (context, continuation) == (fit_prompt(whole[0], 301 - len(whole[1]))[0], whole[1])
    huge = "x" * 5_000_000
    encode_calls.clear()
    _, ids = encode_within(encode, huge, 300)
    assert fit_prompt(ids, 300)[1] == "prompt_too_long" and max(encode_calls) <= 32 * 300
    short = "just a short prompt"
    assert encode_within(encode, short, 300) == (short, tok(short)["input_ids"])


@pytest.mark.parametrize("budget", [None, 10_000])
def test_a_text_that_may_fit_is_tokenized_whole(budget):
    text = "ab " * 2000
    calls: list[str] = []
    encode_within(lambda t: calls.append(t) or [0] * len(t), text, budget)
    assert calls == [text]
