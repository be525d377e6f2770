"""A scripted Engine for the label tests: choice log-probs from a scoring rule, reasoning text from a rule.

`PreferenceScore` makes a labeler with known tastes: each response text has a quality, the slot shown
first gets a bonus (position bias), and the log-prob of answering with slot j is that slot's score,
so every label the stage computes can be checked by hand.
"""

from __future__ import annotations

from collections.abc import Callable

from cai.conversation import HH_STOP, to_hh
from cai.engines.base import Generation, SamplingConfig
from cai.hashing import sha256_of

Score = Callable[[str, int], float]  # (prompt, choice index) -> log-prob


def hashed_score(prompt: str, choice: int) -> float:
    """Arbitrary but deterministic log-probs in (-5, 0]."""
    return -float(int(sha256_of([prompt, choice])[:4], 16) % 500) / 100


class PreferenceScore:
    """log P(answer slot j) = quality of the response shown in slot j (+ `first_bonus` for slot 0).

    The slot order is read from where the response texts occur in the prompt (their last occurrence),
    so it works with any feedback template that shows A before B.
    """

    def __init__(self, quality: dict[str, float], first_bonus: float = 0.0):
        self.quality = quality
        self.first_bonus = first_bonus

    def slots(self, prompt: str) -> list[str]:
        shown = [t for t in self.quality if t in prompt]
        return sorted(shown, key=prompt.rfind)

    def __call__(self, prompt: str, choice: int) -> float:
        slots = self.slots(prompt)
        assert len(slots) == 2, f"expected two known responses in the prompt, found {slots}"
        return self.quality[slots[choice]] + (self.first_bonus if choice == 0 else 0.0)


class FakeEngine:
    """Satisfies cai.engines.base.Engine. Records the size of every call; `fail_after` simulates a crash
    after that many choice_logprobs calls."""

    name = "fake"
    model_id = "fake-labeler-v1"

    def __init__(self, score: Score = hashed_score, reply: Callable[[str, int], str] | None = None,
                 fail_after: int | None = None):
        self.score = score
        self.reply = reply or (lambda prompt, seed: f"thinking about it, seed {seed % 1000}")
        self.fail_after = fail_after
        self.logprob_calls: list[int] = []
        self.generate_calls: list[int] = []
        self.generate_seeds: list[list[int]] = []

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return HH_STOP

    def render_chat(self, messages: list[dict[str, str]], assistant_prefix: str = "") -> str:
        return to_hh(messages, assistant_prefix)

    def generate(self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None = None) -> list[Generation]:
        seeds = seeds if seeds is not None else [sampling.seed + i for i in range(len(prompts))]
        self.generate_calls.append(len(prompts))
        self.generate_seeds.append(list(seeds))
        out = []
        for prompt, seed in zip(prompts, seeds):
            text = self.reply(prompt, seed)
            out.append(Generation(text=text, prompt_tokens=len(prompt.split()), completion_tokens=len(text.split()),
                                  finish_reason="stop"))
        return out

    def choice_logprobs(self, prompts: list[str], choices: list[list[str]]) -> list[list[float]]:
        if self.fail_after is not None and len(self.logprob_calls) >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.logprob_calls.append(len(prompts))
        return [[self.score(p, j) for j in range(len(cs))] for p, cs in zip(prompts, choices)]
