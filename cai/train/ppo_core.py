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


# Positions of the [B, T, V] logits handled at once: at most ~16M floats (64 MB) per chunk, so the
# full-vocabulary temporaries (a 262k-token vocabulary makes a row 1 MB) never exist for all rows.
_CHUNK_FLOATS = 1 << 24


def _position_chunks(shape: torch.Size, length: int) -> list[tuple[int, slice]]:
    """(row, positions) pieces covering the first `length` positions of each of shape[0] rows."""
    step = max(1, _CHUNK_FLOATS // shape[-1])
    return [(b, slice(t, min(t + step, length))) for b in range(shape[0]) for t in range(0, length, step)]


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[token] for one [T, V] piece: the plain formula, which the
    chunked function below applies piece by piece (so its results are those of this formula)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log p(token) for every position, computed and differentiated a chunk of positions at a time.

    Autograd on the plain formula keeps the [B, T, V] log-softmax for backward and, in backward,
    allocates three more tensors of that size (the gather's scatter, the log-softmax gradient, the
    temperature division's gradient), plus one for the slice a caller takes. Here only the logits
    (which exist anyway) are kept; backward recomputes each chunk's log-softmax and writes its
    gradient into one [B, T', V] buffer. Each chunk runs the same kernels on the same rows as the
    plain formula, so values and gradients are the same bits."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        out = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)
        for b, t in _position_chunks(logits.shape, tokens.shape[1]):
            out[b, t] = _token_logprobs(logits[b, t], tokens[b, t], temperature)
        ctx.save_for_backward(logits, tokens)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, tokens = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)  # positions past T (the caller's extra one) get zero
        for b, t in _position_chunks(logits.shape, tokens.shape[1]):
            with torch.enable_grad():
                piece = logits[b, t].detach().requires_grad_()
                logp = _token_logprobs(piece, tokens[b, t], ctx.temperature)
                grad_logits[b, t] = torch.autograd.grad(logp, piece, grad[b, t])[0]
        return grad_logits, None, None


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature): logits [B, T', V] with T' >= T, tokens
    [B, T] -> float32 [B, T]. Position t's logits score token t; positions past T are ignored (pass
    the model's logits unsliced: a slice would cost a full-size copy in backward). Memory: the
    logits and one chunk, not four [B, T, V] tensors (see _ChunkedTokenLogprobs)."""
    if tokens.shape[1] > logits.shape[1]:
        raise ValueError(f"{tokens.shape[1]} tokens but logits for only {logits.shape[1]} positions")
    return _ChunkedTokenLogprobs.apply(logits, tokens, temperature)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, length: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at each of the first `length` positions (default
    all), [B, T', V] -> float32 [B, length]; a chunk of positions at a time, not differentiable."""
    length = logits.shape[1] if length is None else length
    out = torch.empty(logits.shape[0], length, dtype=torch.float32, device=logits.device)
    for b, t in _position_chunks(logits.shape, length):
        logp = F.log_softmax(logits[b, t].float() / temperature, dim=-1)
        out[b, t] = -(logp.exp() * logp).sum(-1)
    return out


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
