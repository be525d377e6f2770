"""PPO arithmetic against hand computations, and the properties the losses must have."""

from __future__ import annotations

import math

import pytest
import torch

from cai.train import ppo_core
from cai.train.ppo_core import (
    KLController,
    KLControllerState,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalised_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    response_mask,
    value_loss,
)

# Row 0 ends after 3 tokens (the 4th is padding with junk values); row 1 uses all 4.
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
REWARDS = torch.tensor([[0.1, -0.2, 1.0, 5.0], [0.0, 0.0, 0.0, 2.0]])
VALUES = torch.tensor([[0.5, 0.4, 0.3, 9.0], [1.0, 1.0, 1.0, 1.0]])


def test_gae_and_returns_equal_hand_computation_with_padding():
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=0.95)
    # row 0: deltas (1.0 - 0.3), (-0.2 + 0.3 - 0.4), (0.1 + 0.4 - 0.5); the padded value 9.0 is ignored
    a2 = 0.7
    a1 = -0.3 + 0.95 * a2
    a0 = 0.0 + 0.95 * a1
    # row 1: only the last delta (2 - 1) is non-zero, then it decays by lambda
    expected_adv = torch.tensor([[a0, a1, a2, 0.0], [0.95**3, 0.95**2, 0.95, 1.0]])
    expected_ret = expected_adv + torch.tensor([[0.5, 0.4, 0.3, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert torch.allclose(adv, expected_adv, atol=1e-6)
    assert torch.allclose(ret, expected_ret, atol=1e-6)
    assert adv[0, 3] == 0 and ret[0, 3] == 0


def test_gae_with_discount():
    rewards = torch.tensor([[1.0, 2.0]])
    values = torch.tensor([[0.0, 0.0]])
    adv, ret = gae(rewards, values, torch.ones(1, 2), gamma=0.5, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[1.0 + 0.5 * 2.0, 2.0]]))
    assert torch.allclose(adv, ret)


def test_gae_ignores_whatever_is_past_the_end():
    junk_r, junk_v = REWARDS.clone(), VALUES.clone()
    junk_r[0, 3], junk_v[0, 3] = -100.0, 42.0
    assert torch.equal(gae(REWARDS, VALUES, MASK, 1.0, 0.95)[0], gae(junk_r, junk_v, MASK, 1.0, 0.95)[0])


def test_kl_penalty_and_score_placement_are_exact():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -0.1], [-2.0, -1.0, -0.5, -1.0]])
    scores = torch.tensor([3.0, -1.0])
    rewards, kl, non_score = kl_penalised_rewards(logp, ref, scores, MASK, kl_coef=0.1)
    expected_kl = torch.tensor([[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, -0.5, 0.0]])
    assert torch.allclose(kl, expected_kl)
    assert torch.allclose(non_score, -0.1 * expected_kl)
    expected = -0.1 * expected_kl
    expected[0, 2] += 3.0  # last real token of row 0 (index 2), not the padded index 3
    expected[1, 3] += -1.0
    assert torch.allclose(rewards, expected)
    assert rewards[0, 3] == 0


def test_response_mask_is_positional_even_when_pad_equals_eos():
    # Row 0 ended at index 1 (its EOS), row 1 never ended, row 2 ended on its first token.
    mask = response_mask(torch.tensor([1, 3, 0]), 4)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_masked_mean_is_token_level_and_whitening_respects_the_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, 7.0]])
    assert masked_mean(x, MASK).item() == pytest.approx((1 + 2 + 3 + 4 + 5 + 6 + 7) / 7)
    w = masked_whiten(x, MASK)
    assert masked_mean(w, MASK).item() == pytest.approx(0.0, abs=1e-6)
    assert w[0, 3] == 0
    kept = masked_whiten(x, MASK, shift_mean=False)
    assert masked_mean(kept, MASK).item() == pytest.approx(masked_mean(x, MASK).item(), rel=1e-5)


def test_logprobs_and_entropy_from_logits():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = (1/4, 3/4)
    assert logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(logits).item() == pytest.approx(expected)


def _plain_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """The unchunked formula, through autograd: what logprobs_from_logits must equal bit for bit."""
    logp = torch.log_softmax(logits[:, : tokens.shape[1]].float() / temperature, dim=-1)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk_floats", [1 << 24, 13, 1])  # all at once, 1-2 positions, one position per chunk
def test_chunked_logprobs_equal_the_plain_formula_in_values_and_gradients(monkeypatch, chunk_floats):
    monkeypatch.setattr(ppo_core, "_CHUNK_FLOATS", chunk_floats)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 6, 11, generator=g)).requires_grad_()  # 6 positions for 5 tokens
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g)
    got = logprobs_from_logits(logits, tokens, 0.7)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), logits)
    want = _plain_logprobs(logits, tokens, 0.7)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), logits)
    assert torch.equal(got, want)
    assert torch.equal(grad_got, grad_want)
    assert grad_got[:, 5].abs().sum() == 0  # the extra last position gets no gradient
    entropy = entropy_from_logits(logits, 5, 0.7)
    p = torch.softmax(logits[:, :5].detach() / 0.7, -1)
    assert torch.allclose(entropy, -(p * p.log()).sum(-1), atol=1e-6)
    with pytest.raises(ValueError, match="6 tokens but logits for only 5 positions"):
        logprobs_from_logits(logits[:, :5], torch.zeros(3, 6, dtype=torch.long))


def test_chunked_logprobs_create_one_full_size_tensor_where_the_plain_formula_creates_seven(monkeypatch):
    """Memory: a [B, T, V] tensor is 1 GB for 8 x 512 tokens of a 64k vocabulary; the plain formula makes
    the temperature-scaled logits and the log-softmax in forward, and the gather's scatter, the
    log-softmax and division gradients and the slice's gradient in backward. Counted with a dispatch
    mode that sees every tensor an operator returns."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountFullSize(TorchDispatchMode):
        def __init__(self, numel: int):
            super().__init__()
            self.numel, self.count = numel, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}
            self.count += sum(isinstance(t, torch.Tensor) and t.numel() >= self.numel  # new memory, not a view
                              and t.untyped_storage().data_ptr() not in inputs
                              for t in (out if isinstance(out, tuple) else (out,)))
            return out

    monkeypatch.setattr(ppo_core, "_CHUNK_FLOATS", 64)
    tokens = torch.randint(0, 64, (2, 8))

    def full_size_created(fn) -> int:
        logits = torch.randn(2, 9, 64, requires_grad=True)
        with CountFullSize(2 * 8 * 64) as mode:
            fn(logits * 1.0, tokens, 0.7).sum().backward()  # * 1.0: a fresh tensor, as a model's output is
        return mode.count - 2  # less the `* 1.0` and its gradient

    assert full_size_created(logprobs_from_logits) == 1  # the gradient buffer
    assert full_size_created(_plain_logprobs) == 7


def test_policy_loss_equals_clipped_surrogate_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    loss, clipfrac, approx_kl = policy_loss(new, old, adv, torch.ones(1, 3), cliprange=0.2)
    # token 0: A>0, ratio clipped to 1.2 -> -1.2; token 1: A>0, ratio below range -> unclipped -0.5
    # token 2: A<0, ratio 1.1 inside range -> 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, rel=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3)
    r = torch.tensor([1.5, 0.5, 1.1])
    assert approx_kl.item() == pytest.approx(((r - 1) - r.log()).mean().item(), rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_policy_loss_clipping_property(seed):
    """Once the ratio leaves [1-eps, 1+eps] in the direction the advantage favours, the token's
    gradient is exactly zero; elsewhere it is -A * ratio; and the loss never beats the unclipped one."""
    g = torch.Generator().manual_seed(seed)
    eps = 0.2
    old = -torch.rand(4, 16, generator=g) * 3
    new = (old + torch.randn(4, 16, generator=g) * 0.4).requires_grad_(True)
    adv = torch.randn(4, 16, generator=g)
    mask = torch.ones(4, 16)
    loss, _, _ = policy_loss(new, old, adv, mask, eps)
    loss.backward()
    ratio = torch.exp(new.detach() - old)
    beyond = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))
    assert beyond.any() and (~beyond).any()
    assert torch.all(new.grad[beyond] == 0)
    expected_grad = -adv * ratio / mask.sum()
    assert torch.allclose(new.grad[~beyond], expected_grad[~beyond], atol=1e-7)
    unclipped = masked_mean(-adv * ratio, mask)
    assert loss.item() >= unclipped.item() - 1e-7


def test_policy_loss_ignores_padding():
    old = torch.zeros(2, 4)
    new = torch.full((2, 4), 0.1)
    adv = torch.ones(2, 4)
    base, _, _ = policy_loss(new, old, adv, MASK, 0.2)
    new[0, 3], adv[0, 3] = 50.0, -7.0
    junk, _, _ = policy_loss(new, old, adv, MASK, 0.2)
    assert base.item() == junk.item()


def test_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[0.5, 0.1]])
    returns = torch.tensor([[1.0, -1.0]])
    loss, clipfrac = value_loss(new, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: clipped value 0.2 -> err max(0.25, 0.64) = 0.64; token 1: inside range -> 1.21
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert explained_variance(returns, returns, torch.ones(1, 4)) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 4) + 2.5, returns, torch.ones(1, 4)) == pytest.approx(0.0)


def test_adaptive_kl_controller_moves_towards_target_and_fixed_stays():
    ctl = KLController(KLControllerState(value=0.2, target=6.0, horizon=100))
    ctl.update(mean_sequence_kl=12.0, n_episodes=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 10 / 100))
    ctl.update(mean_sequence_kl=5.4, n_episodes=10)  # error -0.1
    assert ctl.value == pytest.approx(0.2 * 1.02 * (1 - 0.1 * 0.1))
    fixed = KLController(KLControllerState(value=0.05))
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
