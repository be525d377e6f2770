"""Schemas of the rows the stages write. Every row carries its provenance."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cai import __version__
from cai.conversation import Message
from cai.engines.base import FinishReason


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Provenance(BaseModel):
    """Where a row came from: enough to reproduce it or to refuse to mix it with other runs."""

    model_config = ConfigDict(extra="forbid")

    constitution_name: str
    constitution_sha256: str
    principle_ids: list[str]
    model: str
    engine: str
    seed: int
    sampling: dict[str, Any]
    engine_details: dict[str, Any] | None = Field(None, description="engine version and output-changing options")
    cai_version: str = __version__
    created_at: str = Field(default_factory=utc_now)


class CritiqueStep(BaseModel):
    """One critique -> revision round under one principle."""

    model_config = ConfigDict(extra="forbid")

    principle_id: str
    critique: str
    revision: str
    critique_tokens: int
    revision_tokens: int
    critique_finish: FinishReason
    revision_finish: FinishReason
    copied_few_shot: bool = False  # the revision repeats a long run of words from the few-shot dialogues


class Flags(BaseModel):
    """Things a dataset builder wants to filter on."""

    model_config = ConfigDict(extra="forbid")

    truncated: bool = False  # some generation hit max_new_tokens
    empty: bool = False  # the final response is empty
    revision_unchanged: bool = False  # the final response equals the initial one
    critique_found_nothing: bool = False  # every critique said there was nothing to fix
    copied_few_shot: bool = False  # some step's revision copied words from the few-shot dialogues
    prompt_too_long: bool = False  # some prompt of the row did not fit the model's context (cut or skipped)
    empty_prompt: bool = False  # some prompt of the row had no tokens (not run)
    error: str | None = None  # the engine refused this row even on its own (written once, not retried)

    def kinds(self) -> list[str]:
        return [name for name, value in self.model_dump().items() if value]


class SFTRecord(BaseModel):
    """A critique-revise row: the prompt, the initial response, every round, the final response."""

    model_config = ConfigDict(extra="forbid")

    id: str
    source_index: int  # position of the prompt in the input file (after --limit), for tracing back
    prompt: list[Message]
    initial_response: str
    initial_tokens: int
    initial_finish: FinishReason
    steps: list[CritiqueStep]
    final_response: str
    flags: Flags
    provenance: Provenance

    def messages(self) -> list[dict[str, str]]:
        """The SFT example in chat form: the prompt and the final (revised) response."""
        return [m.model_dump() for m in self.prompt] + [
            {"role": "assistant", "content": self.final_response}
        ]
