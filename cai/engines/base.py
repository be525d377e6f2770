"""The Engine contract every stage talks to: batched generation and batched choice scoring."""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field


class SamplingConfig(BaseModel):
    """How to sample one batch. temperature == 0 means greedy decoding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.7, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    stop: tuple[str, ...] = Field((), description="stop sequences; the returned text excludes them")
    seed: int = Field(0, description="base seed; row i of a call uses seeds[i] if given, else seed + i")


FinishReason = Literal["stop", "eos", "length"]


class Generation(BaseModel):
    """One completion. finish_reason: 'stop' (a stop sequence), 'eos' (end-of-sequence token), 'length'."""

    model_config = ConfigDict(extra="forbid")

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@runtime_checkable
class Engine(Protocol):
    """A text generator. Stages hand it whole batches; the engine decides how to schedule them.

    `generate` must be deterministic per row given its seed: the text for a prompt depends on
    (prompt, sampling, seed) only, not on what else is in the batch, so sharded and resumed runs
    reproduce an uninterrupted run.
    """

    name: str  # "hf", "vllm", ...
    model_id: str  # what provenance records: a hub id or a local path

    def generate(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None = None
    ) -> list[Generation]: ...

    def choice_logprobs(self, prompts: list[str], choices: list[list[str]]) -> list[list[float]]:
        """Total log-prob of each candidate continuation choices[i][j] given prompts[i]."""
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
