"""Test doubles: a scripted Engine for the label tests (choice log-probs from a scoring rule, reasoning
text from a rule), and a fake `vllm` package that behaves like vLLM 0.33 where cai depends on it.

`PreferenceScore` makes a labeler with known tastes: each response text has a quality, the slot shown
first gets a bonus (position bias), and the log-prob of answering with slot j is that slot's score,
so every label the stage computes can be checked by hand.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


# ---------------------------------------------------------------- a fake `vllm` 0.33 package
#
# Behaves like vLLM 0.33.0 where cai depends on it (each point read from its source):
# - `LLM(**kw)` accepts only LLM.__init__'s and EngineArgs's keywords (TypeError otherwise) and
#   refuses data_parallel_size > 1 without the external launcher; starting needs
#   gpu_memory_utilization x the GPU free: a second engine at 0.9 fails like the real one.
# - `SamplingParams(**kw)` accepts only its 0.33 fields; prompt_logprob_token_ids needs the V2 runner.
# - `generate` raises on an empty prompt or one of >= max_model_len tokens, aborting the whole call.
# - prompt_logprobs: a list whose entry 0 is None, the actual token always a key; requests with any
#   prompt log-probs skip reading the prefix cache (counted in `cache_skipping_requests`).
# - finish reasons are strings: stop / length / abort / error / repetition.
# Log-probs follow one rule: the log-prob of token t predicted at position q is -(t % 7 + q) / 10.


def fake_logprob(token: int, position: int) -> float:
    return -(token % 7 + position) / 10


class VLLMValidationError(ValueError):
    pass


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: Any = None
    index: int = 0
    logprobs: list[dict[int, Logprob]] | None = None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_token_id_logprobs: Any = None
    num_cached_tokens: int = 0


class FakeSamplingParams:
    """vllm.SamplingParams: only 0.33's field names; defaults as in 0.33."""

    def __init__(self, **kwargs: Any):
        from vllm_api_033 import SAMPLING_PARAMS

        unknown = sorted(set(kwargs) - SAMPLING_PARAMS)
        if unknown:
            raise TypeError(f"Unexpected keyword argument(s) {unknown} for SamplingParams")
        defaults = {"n": 1, "temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "detokenize": True, "seed": None,
                    "stop": None, "stop_token_ids": None, "logprobs": None, "prompt_logprobs": None,
                    "prompt_logprob_start": None, "prompt_logprob_token_ids": None, "logprob_token_ids": None,
                    "skip_reading_prefix_cache": None}
        self.kwargs = kwargs
        self.__dict__.update({**defaults, **kwargs})
        if self.stop and not self.detokenize:
            raise VLLMValidationError("stop strings are only supported when detokenize is True.")
        if self.skip_reading_prefix_cache is None:
            self.skip_reading_prefix_cache = self.prompt_logprobs is not None or self.prompt_logprob_token_ids is not None


class FakeGPU:
    """One GPU's memory as fractions of its total: engines take their share at start."""

    def __init__(self) -> None:
        self.used = 0.0

    def take(self, share: float) -> None:
        if 1.0 - self.used < share - 1e-9:
            raise ValueError(
                f"Free memory on device cuda:0 ({(1.0 - self.used) * 80:.2f}/80.0 GiB) on startup is less than "
                f"desired GPU memory utilization ({share}, {share * 80:.2f} GiB). Decrease GPU memory "
                "utilization or reduce GPU memory used by other processes."
            )
        self.used += share


class FakeLLM:
    """vllm.LLM over a local model dir (its tokenizer and config); outputs from `script` or the rule above."""

    v2_runner = True

    def __init__(self, module: Any, model: str, **kwargs: Any):
        import weakref

        from transformers import AutoConfig, AutoTokenizer
        from vllm_api_033 import LLM_KEYWORDS

        unknown = sorted(set(kwargs) - LLM_KEYWORDS)
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {unknown[0]!r}")
        dp = int(kwargs.get("data_parallel_size", 1))
        if dp > 1 and kwargs.get("distributed_executor_backend") != "external_launcher":
            raise ValueError(f"LLM(data_parallel_size={dp}) is not supported for single-process usage and may hang.")
        share = kwargs.get("gpu_memory_utilization", 0.92)
        module.gpu.take(share)
        self._release = weakref.finalize(self, FakeLLM._give_back, module.gpu, share)
        self.kwargs = {"model": model, **kwargs}
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        window = kwargs.get("max_model_len") or AutoConfig.from_pretrained(model).max_position_embeddings
        engine_core = types.SimpleNamespace(shutdown=self._release)
        self.llm_engine = types.SimpleNamespace(
            model_config=types.SimpleNamespace(max_model_len=window), engine_core=engine_core,
            vllm_config=types.SimpleNamespace(use_v2_model_runner=self.v2_runner),
        )
        self.calls: list[tuple[list[Any], Any]] = []
        self.script: list[CompletionOutput] = []
        self.cache_skipping_requests = 0
        self.scored_positions = 0  # prompt positions whose log-probs were computed
        module.created.append(self)

    @staticmethod
    def _give_back(gpu: FakeGPU, share: float) -> None:
        gpu.used -= share

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(self, prompts: list[Any], sampling_params: Any, use_tqdm: bool = True) -> list[RequestOutput]:
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        window = self.llm_engine.model_config.max_model_len
        for p, sp in zip(prompts, params):  # validation first: one bad request aborts the call
            n = len(p["prompt_token_ids"])
            if n == 0:
                raise VLLMValidationError("The decoder prompt cannot be empty")
            if n >= window:
                raise VLLMValidationError(f"The decoder prompt (length {n}) is longer than the maximum model length of {window}.")
            if sp.prompt_logprob_token_ids is not None and not self.v2_runner:
                raise VLLMValidationError("prompt_logprob_token_ids requires the V2 model runner (VLLM_USE_V2_MODEL_RUNNER=1).")
        self.calls.append((prompts, sampling_params))
        out = []
        for k, (p, sp) in enumerate(zip(prompts, params)):
            ids = list(p["prompt_token_ids"])
            self.cache_skipping_requests += bool(sp.skip_reading_prefix_cache)
            out.append(self._answer(ids, sp, self.script[len(out)] if self.script and k < len(self.script) else None))
        return out

    def _answer(self, ids: list[int], sp: Any, scripted: CompletionOutput | None) -> RequestOutput:
        done = scripted or CompletionOutput(f"sample {sp.seed}", [5] * sp.max_tokens, "length")
        if sp.logprob_token_ids is not None:
            sampled = done.token_ids[0] if done.token_ids else 5
            done.logprobs = [{t: Logprob(fake_logprob(t, len(ids))) for t in [sampled, *sp.logprob_token_ids]}]
        res = RequestOutput(ids, [done])
        if sp.prompt_logprobs is not None:
            self.scored_positions += len(ids) - 1
            res.prompt_logprobs = [None] + [
                {ids[q]: Logprob(fake_logprob(ids[q], q)), 99999: Logprob(-0.01)} for q in range(1, len(ids))
            ]
        if sp.prompt_logprob_token_ids is not None:
            start = sp.prompt_logprob_start or 0
            rows = sp.prompt_logprob_token_ids
            if len(rows) != len(ids) - 1 - start:
                raise VLLMValidationError(f"prompt_logprob_token_ids has {len(rows)} rows, but the prompt has "
                                          f"{len(ids) - 1 - start} scored rows")
            self.scored_positions += len(rows)
            res.prompt_token_id_logprobs = [[fake_logprob(t, start + r + 1) for t in row] for r, row in enumerate(rows)]
        return res


def make_fake_vllm(version: str = "0.33.0") -> types.ModuleType:
    """A module to install as sys.modules["vllm"]; `module.created` lists the LLMs it made, `module.gpu`
    is the one GPU they share."""
    module = types.ModuleType("vllm")
    module.__version__ = version  # type: ignore[attr-defined]
    module.gpu = FakeGPU()  # type: ignore[attr-defined]
    module.created = []  # type: ignore[attr-defined]
    module.LLM = lambda model, **kw: FakeLLM(module, model, **kw)  # type: ignore[attr-defined]
    module.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    return module
