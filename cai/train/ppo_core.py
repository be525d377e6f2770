"""The arithmetic of PPO for language models, as pure tensor functions.

Everything here takes [batch, response_len] tensors plus a 0/1 `mask` of the real response tokens
(up to and including the token that ended the response). Positions outside the mask never change a
result, so padding, and whatever was sampled after EOS, cannot leak into rewards, advantages or
losses. Kept apart from the training loop so each piece can be checked against a hand computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the positions where mask is 1 (a token-level mean, not a mean of row means)."""
    if dim is None:
        return masked_sum(x, mask) / mask.sum().clamp(min=1)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Scale to unit variance over the masked positions (and zero mean if `shift_mean`).

    Rewards are whitened with shift_mean=False: shifting them would turn "stop now" into a
    reward or a penalty depending on the batch, which biases response length.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under softmax(logits); logits [B, T, V], tokens [B, T] -> [B, T]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution, [B, T, V] -> [B, T]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def response_mask(ended_at: torch.Tensor, length: int) -> torch.Tensor:
    """0/1 mask [B, length]: 1 for positions <= ended_at[b] (the index of the last real token).

    Built from positions, never from token ids, so a pad token equal to EOS cannot hide a real EOS.
    """
    positions = torch.arange(length, device=ended_at.device).unsqueeze(0)
    return (positions <= ended_at.unsqueeze(1)).float()


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a prefix mask (-1 for an empty row)."""
    return mask.sum(1).long() - 1


def kl_penalised_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * (logp - logp_ref) everywhere, plus the score on the last token.

    Returns (rewards, kl, non_score_rewards), all [B, T] and zero outside the mask. `kl` is the
    k1 estimate log p - log p_ref of each sampled token; its row sum estimates the sequence KL.
    """
    kl = (logprobs - ref_logprobs) * mask
    non_score = -kl_coef * kl
    rewards = non_score.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    last = last_index(mask)
    has_token = last >= 0
    rewards[rows[has_token], last[has_token]] += scores[has_token].to(rewards.dtype)
    return rewards, kl, non_score


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response; returns (advantages, returns).

    The episode ends at the last masked token: values and rewards past it are zeroed, so the last
    real token bootstraps from 0, and both outputs are 0 on padding.
    """
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective (to minimise). Returns (loss, clip_fraction, approx_kl).

    approx_kl is the k3 estimate E[(r - 1) - log r] of KL(old || new), always >= 0.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clip_fraction.detach(), approx_kl.detach()


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((v - R)^2, (v_clipped - R)^2). Returns (loss, clip_fraction)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    clip_fraction = masked_mean((clipped_err > unclipped_err).float(), mask)
    return loss, clip_fraction.detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 is a perfect critic, <= 0 a useless one."""
    var_returns = masked_var(returns, mask)
    if var_returns <= 0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_returns)


class KLControllerState(BaseModel):
    """The KL coefficient and how it adapts; saved in checkpoints so a resumed run continues it."""

    model_config = ConfigDict(extra="forbid")

    value: float = Field(ge=0.0)
    target: float | None = Field(None, gt=0.0, description="target sequence KL (nats); None = fixed")
    horizon: int = Field(10_000, ge=1)


class KLController:
    """Fixed or adaptive (proportional) KL coefficient, as in Ziegler et al. 2019.

    The adaptive rule moves the coefficient by at most 20% of n_episodes / horizon per update,
    towards the value that keeps the mean sequence KL at `target`.
    """

    def __init__(self, state: KLControllerState):
        self.state = state

    @property
    def value(self) -> float:
        return self.state.value

    def update(self, mean_sequence_kl: float, n_episodes: int) -> None:
        if self.state.target is None:
            return
        error = min(max(mean_sequence_kl / self.state.target - 1.0, -0.2), 0.2)
        self.state.value *= 1.0 + error * n_episodes / self.state.horizon
