"""Sampling rollouts from the policy being trained, keeping the token ids PPO needs.

Text engines return strings; PPO needs the exact sampled token ids and where each response ended,
because re-tokenizing decoded text does not always give back the same ids. This sampler runs the
in-memory policy with a KV cache, left-padded prompts and explicit position ids, and draws each
row from its own seeded generator, so a row's response depends only on (prompt, seed, weights) and
a resumed run samples exactly what the uninterrupted run sampled. Rows that have ended leave the
batch (and the KV cache), so a few long responses do not keep the whole batch busy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cai.engines.base import FinishReason, SamplingConfig
from cai.engines.hf import end_token_ids, left_pad, position_ids, sample_rows


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


class PolicySampler:
    """Temperature sampling from an in-memory causal LM, returning token-level rollouts.

    A response ends at an end token (EOS, the generation config's EOS ids, a chat template's
    end-of-turn token) or when its decoded text contains one of `stop` (the HH format's next turn).
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
        R = max(len(t) for t in out_tokens)
        response = torch.full((B, R), self.pad_id, dtype=torch.long)
        for i, t in enumerate(out_tokens):
            response[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        ended_at = torch.tensor([len(t) - 1 for t in out_tokens])
        return Rollout(
            query=query, query_mask=query_mask, response=response, ended_at=ended_at,
            finish_reasons=final, texts=[self._text(t, r) for t, r in zip(out_tokens, final)],
        )
