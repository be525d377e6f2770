"""A scripted Engine for stage tests: deterministic text from (prompt, seed), or a script's rules."""

from __future__ import annotations

import time
from collections.abc import Callable

from cai.conversation import HH_STOP, to_hh
from cai.engines.base import Generation, SamplingConfig
from cai.hashing import sha256_of

Rule = Callable[[str, int], "tuple[str, str] | None"]  # (prompt, seed) -> (text, finish) or None


class ScriptedEngine:
    """Answers from `rules` (first match wins), else a pseudo-random word string keyed by (prompt, seed).

    `fail_after` raises after that many generate() calls, to simulate a crash mid-run; `delay` seconds
    of sleep per call keep a run going long enough to kill one of its workers.
    """

    name = "scripted"
    model_id = "scripted-v1"

    def __init__(self, rules: list[Rule] | None = None, fail_after: int | None = None, delay: float = 0.0):
        self.rules = rules or []
        self.fail_after = fail_after
        self.delay = delay
        self.calls: list[int] = []  # batch size of each generate call

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return HH_STOP

    def render_chat(self, messages: list[dict[str, str]], assistant_prefix: str = "") -> str:
        return to_hh(messages, assistant_prefix)

    def generate(self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None = None) -> list[Generation]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls.append(len(prompts))
        time.sleep(self.delay)
        seeds = seeds if seeds is not None else [sampling.seed + i for i in range(len(prompts))]
        out = []
        for prompt, seed in zip(prompts, seeds):
            for rule in self.rules:
                hit = rule(prompt, seed)
                if hit is not None:
                    text, finish = hit
                    break
            else:
                words = ["safe", "answer", "kind", "help", "care", "note", "clear", "plan"]
                h = sha256_of([prompt, seed])
                text = " ".join(words[int(c, 16) % 8] for c in h[:6])
                finish = "stop"
            out.append(Generation(text=text, prompt_tokens=len(prompt.split()),
                                  completion_tokens=len(text.split()), finish_reason=finish))
        return out

    def choice_logprobs(self, prompts: list[str], choices: list[list[str]]) -> list[list[float]]:
        return [[-float(int(sha256_of([p, c])[:4], 16) % 50) / 10 for c in cs] for p, cs in zip(prompts, choices)]
