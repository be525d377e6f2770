"""Sampling rollouts from the policy being trained, keeping the token ids PPO needs.

Text engines return strings; PPO needs the exact sampled token ids and where each response ended,
because re-tokenizing decoded text does not always give back the same ids. This sampler runs the
in-memory policy with a KV cache, left-padded prompts and explicit position ids, and draws each
row from its own seeded generator, so a row's response depends only on (prompt, seed, weights) and
a resumed run samples exactly what the uninterrupted run sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cai.engines.base import FinishReason


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
        return torch.tensor([r != "length" for r in self.finish_reasons])


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a turn: the tokenizer's EOS plus the generation config's (e.g. end-of-turn)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return {i for i in ids if i is not None}


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token, whatever the left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PolicySampler:
    """Temperature sampling from an in-memory causal LM, returning token-level rollouts."""

    def __init__(self, model: Any, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.model = model
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # a stop string spans at most this many tokens (each token decodes to >= 1 character)
        self._tail = max((len(s) for s in self.stop), default=0) + 2

    def _stop_hit(self, tokens: list[int]) -> bool:
        tail = self.tokenizer.decode(tokens[-self._tail:], skip_special_tokens=False)
        return any(s in tail for s in self.stop)

    def _text(self, tokens: list[int], reason: FinishReason) -> str:
        if reason == "eos":
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if reason == "stop":
            cut = min(text.find(s) for s in self.stop if s in text)
            text = text[:cut]
        return text.strip()

    @torch.no_grad()
    def sample(
        self, prompts: list[list[int]], temperature: float, max_new_tokens: int, seeds: list[int]
    ) -> Rollout:
        """Sample one response per prompt (token ids); row i draws from a generator seeded by seeds[i]."""
        device = next(self.model.parameters()).device
        query, query_mask = left_pad(prompts, self.pad_id)
        query, query_mask = query.to(device), query_mask.to(device)
        gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        B = len(prompts)
        attention = query_mask
        positions = position_ids(query_mask)
        inputs, past = query, None
        out_tokens: list[list[int]] = [[] for _ in range(B)]
        reasons: list[FinishReason | None] = [None] * B
        was_training = self.model.training
        self.model.eval()
        for _ in range(max_new_tokens):
            out = self.model(
                input_ids=inputs, attention_mask=attention, position_ids=positions,
                past_key_values=past, use_cache=True, logits_to_keep=1,
            )
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.cat([torch.multinomial(probs[i], 1, generator=gens[i]) for i in range(B)])
            else:
                nxt = logits.argmax(-1)
            for i, tok in enumerate(nxt.tolist()):
                if reasons[i] is not None:
                    nxt[i] = self.pad_id
                    continue
                out_tokens[i].append(tok)
                if tok in self.stop_ids:
                    reasons[i] = "eos"
                elif self.stop and self._stop_hit(out_tokens[i]):
                    reasons[i] = "stop"
            if all(r is not None for r in reasons):
                break
            inputs = nxt.unsqueeze(1)
            attention = torch.cat([attention, torch.ones_like(inputs)], dim=1)
            positions = positions[:, -1:] + 1
        self.model.train(was_training)
        final: list[FinishReason] = [r or "length" for r in reasons]
        R = max(len(t) for t in out_tokens)
        response = torch.full((B, R), self.pad_id, dtype=torch.long)
        for i, t in enumerate(out_tokens):
            response[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        ended_at = torch.tensor([len(t) - 1 for t in out_tokens])
        return Rollout(
            query=query.cpu(), query_mask=query_mask.cpu(), response=response, ended_at=ended_at,
            finish_reasons=final, texts=[self._text(t, r) for t, r in zip(out_tokens, final)],
        )
