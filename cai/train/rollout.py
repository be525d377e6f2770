"""Sampling rollouts from the policy being trained, keeping the token ids PPO needs.

Text engines return strings; PPO needs the exact sampled token ids and where each response ended,
because re-tokenizing decoded text does not always give back the same ids. Two samplers share one
contract (`RolloutSampler`): `PolicySampler` runs the in-memory policy itself (the hf engine's way:
a KV cache, left-padded prompts, explicit position ids), and `VLLMSampler` asks a colocated vLLM
engine for token ids and copies the policy's weights into it after every update (`sync`). Each row
draws from its own seed, so a row's response depends only on (prompt, seed, weights) and a resumed
run samples exactly what the uninterrupted run sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from cai.engines.base import FinishReason, SamplingConfig
from cai.engines.hf import sample_rows
from cai.tokens import end_token_ids, left_pad, position_ids, right_pad
from cai.train.fsdp import gathered

if TYPE_CHECKING:
    from cai.engines.vllm import VLLMEngine


@dataclass
class Rollout:
    """A batch of prompts and sampled responses, as tensors aligned for one forward pass.

    query [B, Q] is left-padded (query_mask marks real tokens); response [B, R] holds the sampled
    ids, filled with pad after each row's end; ended_at[b] is the index of row b's last real token
    (the EOS or the token that completed a stop sequence, else R - 1).
    """

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    ended_at: torch.Tensor
    finish_reasons: list[FinishReason]
    texts: list[str]  # decoded responses without EOS / stop sequence

    @property
    def ended(self) -> torch.Tensor:
        """True for rows that finished on their own (EOS or stop sequence) within the budget."""
        return torch.tensor([r in ("eos", "stop") for r in self.finish_reasons])  # not length/abort/error/repetition


class RolloutSampler(Protocol):
    """What PPO samples its rollouts from."""

    def sample(self, prompts: list[list[int]], temperature: float, max_new_tokens: int,
               seeds: list[int]) -> Rollout:
        """One response per prompt (token ids); row i draws from a generator seeded by seeds[i]."""
        ...

    def sync(self, policy: torch.nn.Module) -> None:
        """Make the next `sample` use the policy's current weights."""
        ...


def response_text(tokenizer: Any, tokens: Sequence[int], reason: FinishReason, stop: tuple[str, ...]) -> str:
    """The text PPO scores: no end token, nothing from the stop sequence on."""
    if reason == "eos":
        tokens = tokens[:-1]
    text = tokenizer.decode(list(tokens), skip_special_tokens=True)
    if reason == "stop":
        hits = [text.find(s) for s in stop if s in text]
        text = text[:min(hits)] if hits else text
    return text.strip()


def build_rollout(query: torch.Tensor, query_mask: torch.Tensor, tokens: list[list[int]],
                  reasons: list[FinishReason], tokenizer: Any, stop: tuple[str, ...], pad_id: int) -> Rollout:
    """The left-padded prompts and each row's sampled ids (right-padded after its end) as one Rollout,
    with the response texts PPO scores."""
    response, _ = right_pad(tokens, pad_id)
    ended_at = torch.tensor([len(t) - 1 for t in tokens])
    texts = [response_text(tokenizer, t, r, stop) for t, r in zip(tokens, reasons)]
    return Rollout(query=query, query_mask=query_mask, response=response, ended_at=ended_at,
                   finish_reasons=reasons, texts=texts)


class PolicySampler:
    """Temperature sampling from an in-memory causal LM, returning token-level rollouts.

    A response ends at an end token (EOS, the generation config's EOS ids, a chat template's
    end-of-turn token) or when its decoded text contains one of `stop` (the HH format's next turn).
    It samples from the very model PPO updates, so `sync` has nothing to do. Rows that have ended
    leave the batch (and the KV cache), so a few long responses do not keep the whole batch busy.
    A sharded (FSDP) policy is gathered for the whole of `sample`: each process generates on its own.
    """

    def __init__(self, model: Any, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.model = model
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.stop_ids = end_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # a stop string spans at most this many tokens (each token decodes to >= 1 character)
        self._tail = max((len(s) for s in self.stop), default=0) + 2

    def _stop_hit(self, tokens: list[int]) -> bool:
        tail = self.tokenizer.decode(tokens[-self._tail:], skip_special_tokens=False)
        return any(s in tail for s in self.stop)

    @torch.no_grad()
    def sample(
        self, prompts: list[list[int]], temperature: float, max_new_tokens: int, seeds: list[int]
    ) -> Rollout:
        with gathered(self.model):
            return self._sample(prompts, temperature, max_new_tokens, seeds)

    def _sample(self, prompts: list[list[int]], temperature: float, max_new_tokens: int, seeds: list[int]) -> Rollout:
        device = next(self.model.parameters()).device
        sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
        query, query_mask = left_pad(prompts, self.pad_id, torch.device("cpu"))
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]  # CPU: the same stream on any device
        B = len(prompts)
        inputs, attention = query.to(device), query_mask.to(device)
        positions = position_ids(attention)
        past = None
        active = list(range(B))  # rows still generating, in cache order
        out_tokens: list[list[int]] = [[] for _ in range(B)]
        reasons: list[FinishReason | None] = [None] * B
        was_training = self.model.training
        self.model.eval()
        try:
            for _ in range(max_new_tokens):
                out = self.model(
                    input_ids=inputs, attention_mask=attention, position_ids=positions,
                    past_key_values=past, use_cache=True, logits_to_keep=1,
                )
                past = out.past_key_values
                nxt = sample_rows(out.logits[:, -1, :], sampling, [gens[i] for i in active])
                keep = []
                for j, (i, tok) in enumerate(zip(active, nxt.tolist())):
                    out_tokens[i].append(tok)
                    if tok in self.stop_ids:
                        reasons[i] = "eos"
                    elif self.stop and self._stop_hit(out_tokens[i]):
                        reasons[i] = "stop"
                    else:
                        keep.append(j)
                if not keep:
                    break
                if len(keep) < len(active):
                    sel = torch.tensor(keep, device=device)
                    past.batch_select_indices(sel)
                    attention, positions, nxt = attention[sel], positions[sel], nxt[sel]
                    active = [active[j] for j in keep]
                inputs = nxt.unsqueeze(1)
                attention = torch.cat([attention, torch.ones_like(inputs)], dim=1)
                positions = positions[:, -1:] + 1
        finally:
            self.model.train(was_training)
        final: list[FinishReason] = [r or "length" for r in reasons]
        return build_rollout(query, query_mask, out_tokens, final, self.tokenizer, self.stop, self.pad_id)

    def sync(self, policy: torch.nn.Module) -> None:
        self.model = policy


class VLLMSampler:
    """Rollouts from a vLLM engine colocated in the trainer's process (one per GPU).

    vLLM returns the sampled token ids with each completion; a response that ended on EOS gets the
    end token appended if vLLM left it out, so PPO always scores the token that ended the episode.
    After each PPO update `sync` copies the policy's weights into vLLM's model (same names as the
    transformers checkpoint it loaded; a LoRA policy's merged weights) and drops prefix-cache blocks
    computed with the old weights. With `sleep`, the engine sleeps (level 1: KV cache freed, weights
    offloaded) after each rollout, while PPO updates, and `sync` wakes it first.
    """

    def __init__(self, engine: VLLMEngine, tokenizer: Any, stop: tuple[str, ...] = (), sleep: bool = False):
        self.engine = engine
        self.sleep, self.asleep = sleep, False
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        eos = tokenizer.eos_token_id
        self.end_ids = end_token_ids(tokenizer, None) | ({eos} if eos is not None else set())
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def sample(self, prompts: list[list[int]], temperature: float, max_new_tokens: int,
               seeds: list[int]) -> Rollout:
        sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens, stop=self.stop)
        tokens, reasons = [], []
        for ids, reason in self.engine.generate_ids(prompts, sampling, seeds):
            ids = list(ids)
            if reason == "eos" and (not ids or ids[-1] not in self.end_ids):
                ids.append(self.tokenizer.eos_token_id)
            if not ids:  # a zero-token completion cannot be scored or trained on
                ids, reason = [self.tokenizer.eos_token_id], "eos"
            tokens.append(ids)
            reasons.append(reason)
        if self.sleep:  # the update needs the memory more than the idle engine does
            self.engine.llm.sleep(level=1)
            self.asleep = True
        query, query_mask = left_pad(prompts, self.pad_id, torch.device("cpu"))
        return build_rollout(query, query_mask, tokens, reasons, self.tokenizer, self.stop, self.pad_id)

    def sync(self, policy: torch.nn.Module) -> None:
        from cai.train.lora import merged_weights

        if self.asleep:
            self.engine.llm.wake_up()
            self.asleep = False
        self.engine.load_weights(merged_weights(policy))  # a LoRA policy: merged, under the base model's names
