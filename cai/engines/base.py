"""The Engine contract every stage talks to: batched generation and batched choice scoring."""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field


class SamplingConfig(BaseModel):
    """How to sample one batch. temperature == 0 means greedy decoding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.7, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    stop: tuple[str, ...] = Field((), description="stop sequences; the returned text excludes them")
    seed: int = Field(0, description="base seed; row i of a call uses seeds[i] if given, else seed + i")


# stop: a stop sequence; eos: an end-of-sequence or end-of-turn token; length: max_new_tokens or the
# model's context; abort / error / repetition: vLLM ended the request early (cancelled, a request-level
# failure, a repeated n-gram); skipped: the engine did not run the row (its flag says why).
FinishReason = Literal["stop", "eos", "length", "abort", "error", "repetition", "skipped"]

# Why a row's prompt was not run as given: longer than the model's context (cut or skipped by the
# engine's `overlong` rule) or empty (no token to continue from: always skipped).
RowFlag = Literal["prompt_too_long", "empty_prompt"]
ROW_FLAGS: tuple[RowFlag, ...] = ("prompt_too_long", "empty_prompt")


class Generation(BaseModel):
    """One completion, with `flag` set when its prompt was cut or not run (see RowFlag)."""

    model_config = ConfigDict(extra="forbid")

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    flag: RowFlag | None = None


class Scores(list):  # type: ignore[type-arg]
    """The log-probs of one prompt's choices (a list of floats) plus the prompt's RowFlag, if any.

    A plain list to every caller that does not care; a stage that counts flags reads `.flag`
    (engines that never flag may return plain lists: read it with `getattr(s, "flag", None)`).
    A skipped row scores 0.0 for every choice: no preference."""

    def __init__(self, values: list[float], flag: RowFlag | None = None):
        super().__init__(values)
        self.flag = flag


def row_flag(scores: object) -> RowFlag | None:
    """The flag of a choice_logprobs row (None for engines that return plain lists)."""
    return getattr(scores, "flag", None)


@runtime_checkable
class Engine(Protocol):
    """A text generator. Stages hand it whole batches; the engine decides how to schedule them.

    Guarantees:
    - Seeds are per row: a row's sample is drawn with seeds[i] only. Whether its *text* is also
      independent of the batch is engine-specific: the hf engine's per-row RNG makes it so up to
      floating-point effects of padding; vLLM only with batch invariance on (see README).
    - A bad row never fails its batch: a prompt longer than the context is cut (keeping its first
      token and its end) or skipped, an empty one is skipped; the row's `flag` says which.
    - `model_id` is stable across machines: a hub id, or a digest of the model's config and
      weight file names and sizes, never a local path (see cai.engines.identity).
    """

    name: str  # "hf", "vllm", ...
    model_id: str  # what provenance records (see cai.engines.identity)

    def generate(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None = None
    ) -> list[Generation]: ...

    def choice_logprobs(self, prompts: list[str], choices: list[list[str]]) -> list[list[float]]:
        """Total log-prob of each candidate continuation choices[i][j] given prompts[i].

        prompt + choice are tokenized together and split at the prompt's token length (the
        lm-eval-harness rule), so a token that merges across the boundary is scored as the model
        would read the joined text. Engines may return `Scores` rows that carry a RowFlag."""
        ...

    def details(self) -> dict[str, Any]:
        """What, besides model_id and name, can change this engine's outputs: its version and the
        output-changing options. Recorded in provenance and in stage fingerprints."""
        ...

    def render_chat(self, messages: list[dict[str, str]], assistant_prefix: str = "") -> str:
        """Text to feed the model so it continues as the assistant after `messages`.

        Base models use the HH transcript format; chat models use the tokenizer's chat template.
        `assistant_prefix` is text the assistant turn starts with (e.g. "Critique:").
        """
        ...

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        """Stop sequences that end an assistant turn in this engine's chat format."""
        ...


def engine_details(engine: Engine) -> dict[str, Any] | None:
    """engine.details(), or None for engines without it (test doubles): what provenance and stage
    fingerprints record about the engine besides its name and model_id."""
    details = getattr(engine, "details", None)
    return (dict(details()) or None) if callable(details) else None


def engine_fingerprint(engine: Engine) -> dict[str, Any]:
    """The part of a stage fingerprint that comes from the engine beyond model_id and name:
    {"engine_details": ...}, or {} when the engine reports none (so test doubles keep their ids)."""
    details = engine_details(engine)
    return {"engine_details": details} if details else {}
