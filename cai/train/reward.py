"""Reward-model trainer: a one-output sequence-classification head on a causal LM, trained with a
Bradley-Terry loss on soft labels (AI feedback) and hard labels (human pairs).

Each preference row becomes two token sequences, conversation + chosen and conversation +
rejected, rendered the way the policy sees them (the tokenizer's chat template, else the HH
transcript) and ended with EOS; the reward is the head's output at the last real token. Chosen and
rejected rows of a batch go through the model in one forward pass, right-padded to the longest
sequence of that batch. Over max_length the prompt is cut from the left (keeping BOS), so the
final assistant turn, which is what the reward judges, always survives.

After training the reward mean and std on the test pairs are stored in the model config
(`cai_reward_mean`, `cai_reward_std`) so PPO can read normalised scores (mean 0, std 1).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai.errors import CaiError, InputError
from cai.stages.pairs import PreferenceRow
from cai.store import read_records
from cai.tokens import encode_completion, encode_prompt, ensure_pad_token, render_chat, right_pad
from cai.train.checkpoint import FINAL, save_final, write_json
from cai.train.config import TrainConfig
from cai.train.devices import dist_info
from cai.train.loop import LossFn, fit, open_run, start_supervised
from cai.train.lora import adapter_off, add_lora
from cai.train.metrics import plot_curves
from cai.train.models import fp32_head, load_dtype, prepare_model

log = logging.getLogger(__name__)

CALIBRATION_BINS = 10


class RewardConfig(TrainConfig):
    """`cai train rm` config: the shared TrainConfig fields plus data and loss settings."""

    train_file: str = Field(description="preference rows (mix output train.jsonl)")
    test_file: str | None = Field(None, description="held-out preference rows (mix output test.jsonl)")
    max_length: int = Field(512, ge=8, description="tokens per sequence; the prompt is cut from the left")
    margin: float = Field(0.0, ge=0.0, description="Bradley-Terry margin m (see bt_loss)")
    center_coef: float = Field(0.0, ge=0.0, description="weight of the reward-centering term mean((r_c + r_r)^2)")
    source_weights: dict[str, float] = Field(default_factory=dict, description="loss weight per source (default 1)")
    group_by_length: bool = Field(True, description="batch pairs of similar length together (less padding)")
    eval_batch_size: int = Field(16, ge=1)
    limit_train: int | None = Field(None, ge=1, description="use only the first N training rows")
    limit_test: int | None = Field(None, ge=1, description="use only the first N test rows")

    @model_validator(mode="after")
    def _weights(self) -> RewardConfig:
        bad = {k: v for k, v in self.source_weights.items() if v < 0}
        if bad:
            raise ValueError(f"source_weights must be >= 0, got {bad}")
        return self


# ---------------------------------------------------------------- loss


def bt_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    label_prob: torch.Tensor,
    margin: float = 0.0,
    center_coef: float = 0.0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley-Terry loss with soft labels, margin, reward centering and per-row weights.

    With d = r_c - r_r, p = label_prob (probability that chosen is better), m = margin and w the
    row weights (default 1), this returns (loss, per_row) where

        per_row = -[ p * log sigmoid(d - m) + (1 - p) * log sigmoid(-d - m) ]
        loss    = mean(w * per_row) + center_coef * mean((r_c + r_r)^2)

    p = 1 gives the usual hard-label loss -log sigmoid(d - m). The weighted term is divided by the
    number of rows, not by sum(w), so a source's weight scales its gradient even in a batch that
    holds only that source. The centering term pulls the reward of each pair towards 0.
    """
    d = r_chosen.float() - r_rejected.float()
    p = label_prob.float()
    per_row = -(p * F.logsigmoid(d - margin) + (1 - p) * F.logsigmoid(-d - margin))
    w = torch.ones_like(per_row) if weights is None else weights.float()
    loss = (w * per_row).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen.float() + r_rejected.float()) ** 2).mean()
    return loss, per_row


def pair_correct(d: torch.Tensor, label_prob: torch.Tensor) -> torch.Tensor:
    """1 where the reward ranks the pair the way the label does, 0 where not, NaN for p = 0.5 (no preference)."""
    right = ((d > 0) == (label_prob > 0.5)).float()
    return torch.where(label_prob == 0.5, torch.full_like(right, float("nan")), right)


def expected_calibration_error(pred: torch.Tensor, target: torch.Tensor, bins: int = CALIBRATION_BINS) -> float:
    """ECE of predicted probabilities sigmoid(d) against label probabilities: the mean over equal-width
    bins of pred of |mean(pred) - mean(target)|, weighted by the bin's share of pairs."""
    if pred.numel() == 0:
        return float("nan")
    idx = (pred.clamp(0, 1) * bins).long().clamp(max=bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += float(sel.float().mean() * (pred[sel].mean() - target[sel].mean()).abs())
    return total


# ---------------------------------------------------------------- data


class PairTokens(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chosen: list[int]
    rejected: list[int]
    label_prob: float
    source: str
    truncated: bool


def encode_response(tokenizer: Any, context: list[dict[str, str]], response: str, max_length: int) -> tuple[list[int], bool]:
    """Token ids of context + response + EOS, at most max_length: the prompt is cut from the left
    (its first token, BOS, stays); only a response longer than the whole budget is cut on the right
    (its EOS stays). Returns (ids, truncated)."""
    prompt = encode_prompt(tokenizer, render_chat(tokenizer, context))
    reply = encode_completion(tokenizer, context, response)
    eos = tokenizer.eos_token_id
    if len(prompt) + len(reply) <= max_length:
        return prompt + reply, False
    head = prompt[:1] if tokenizer.bos_token_id is not None and prompt[:1] == [tokenizer.bos_token_id] else []
    room = max_length - len(head) - len(reply)
    if room >= 1:
        return head + prompt[len(prompt) - room:] + reply, True
    keep = max_length - len(head) - 2  # one prompt token + the reply's EOS
    return head + prompt[-1:] + reply[:keep] + [eos], True


def tokenize_pair(tokenizer: Any, row: PreferenceRow, max_length: int) -> PairTokens:
    prompt = [m.model_dump() for m in row.prompt]
    sides = []
    for side in (row.chosen, row.rejected):
        msgs = [m.model_dump() for m in side]
        sides.append(encode_response(tokenizer, prompt + msgs[:-1], msgs[-1]["content"], max_length))
    (c, tc), (r, tr) = sides
    return PairTokens(chosen=c, rejected=r, label_prob=row.label_prob, source=row.source, truncated=tc or tr)


def load_pairs(path: str | Path, tokenizer: Any, max_length: int, limit: int | None = None) -> list[PairTokens]:
    p = Path(path)
    if not p.exists():
        raise InputError(str(p), "file not found")
    rows = read_records(p, PreferenceRow)[:limit]
    if not rows:
        raise InputError(str(p), "no preference rows in file")
    for i, row in enumerate(rows, start=1):
        if row.chosen[-1].role != "assistant" or row.rejected[-1].role != "assistant":
            raise InputError(str(p), "chosen and rejected must end with an assistant message", line=i)
    return [tokenize_pair(tokenizer, r, max_length) for r in rows]


def collate_pairs(pairs: list[PairTokens], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B, T] right-padded ids and mask: the B chosen sequences, then the B rejected ones; T is the
    longest sequence of this batch."""
    ids, mask = right_pad([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return ids.to(device), mask.to(device)


def pair_rewards(model: torch.nn.Module, pairs: list[PairTokens], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) of a batch, from one forward pass."""
    ids, mask = collate_pairs(pairs, pad_id, device)
    rewards = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    n = len(pairs)
    return rewards[:n], rewards[n:]


# ---------------------------------------------------------------- model


def load_reward_model(path: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Tokenizer and a one-output sequence-classification model on any causal LM (or a trained RM).
    A fresh head is initialised N(0, 1/sqrt(hidden + 1)), the pad token is made distinct from EOS."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from cai.engines.hf import model_not_found

    local_only = not Path(path).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        cfg = AutoConfig.from_pretrained(path, local_files_only=local_only)
        trained = any(a.endswith("ForSequenceClassification") for a in cfg.architectures or [])
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, local_files_only=local_only
        )
    except (OSError, ValueError) as e:
        raise model_not_found(path, e) from e
    if not trained:
        head = model.score if hasattr(model, "score") else model.get_output_embeddings()
        if head is None:
            raise CaiError(f"cannot find the classification head of {type(model).__name__}")
        hidden = head.weight.shape[1]
        with torch.no_grad():
            head.weight.normal_(0.0, 1.0 / math.sqrt(hidden + 1))
            if getattr(head, "bias", None) is not None:
                head.bias.zero_()
    ensure_pad_token(tokenizer, model)
    tokenizer.padding_side = "right"
    return tokenizer, model


# ---------------------------------------------------------------- evaluation


class SourceMetrics(BaseModel):
    pairs: int
    accuracy: float
    loss: float


class EvalResult(BaseModel):
    overall: SourceMetrics
    per_source: dict[str, SourceMetrics]
    reward_mean: float
    reward_std: float
    chosen_mean: float
    rejected_mean: float
    ece: float

    def flat(self) -> dict[str, float]:
        out = {"accuracy": self.overall.accuracy, "loss": self.overall.loss, "reward_mean": self.reward_mean,
               "reward_std": self.reward_std, "chosen_mean": self.chosen_mean, "rejected_mean": self.rejected_mean,
               "ece": self.ece}
        for src, m in self.per_source.items():
            out[f"{src}/accuracy"] = m.accuracy
            out[f"{src}/loss"] = m.loss
        return out


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else float("nan")


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, pairs: list[PairTokens], pad_id: int, accelerator: Any,
                   batch_size: int, margin: float = 0.0) -> EvalResult:
    """Accuracy and loss per source and overall, reward stats, ECE of sigmoid(r_c - r_r) vs label_prob.
    Pairs are split across processes and sorted by length (less padding); results are gathered."""
    from accelerate.utils import gather_object

    rank, world = dist_info(accelerator)
    mine = sorted(range(rank, len(pairs), world), key=lambda i: -len(pairs[i].chosen) - len(pairs[i].rejected))
    rows: list[tuple[int, float, float]] = []
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        rc, rr = pair_rewards(model, [pairs[i] for i in idx], pad_id, accelerator.device)
        rows.extend(zip(idx, rc.float().tolist(), rr.float().tolist()))
    if world > 1:
        rows = gather_object(rows)
    rows.sort()
    rc = torch.tensor([r[1] for r in rows])
    rr = torch.tensor([r[2] for r in rows])
    p = torch.tensor([pairs[r[0]].label_prob for r in rows])
    sources = [pairs[r[0]].source for r in rows]
    _, per_row = bt_loss(rc, rr, p, margin)
    correct = pair_correct(rc - rr, p)

    def metrics(sel: torch.Tensor) -> SourceMetrics:
        return SourceMetrics(pairs=int(sel.sum()), accuracy=_nanmean(correct[sel]), loss=float(per_row[sel].mean()))

    everything = torch.ones(len(rows), dtype=torch.bool)
    per_source = {s: metrics(torch.tensor([x == s for x in sources])) for s in sorted(set(sources))}
    both = torch.cat([rc, rr])
    return EvalResult(
        overall=metrics(everything), per_source=per_source, reward_mean=float(both.mean()),
        reward_std=float(both.std()) if both.numel() > 1 else 0.0, chosen_mean=float(rc.mean()),
        rejected_mean=float(rr.mean()), ece=expected_calibration_error(torch.sigmoid(rc - rr), p),
    )


# ---------------------------------------------------------------- run


class RewardSummary(BaseModel):
    model: str
    steps: int
    samples: int
    train_pairs: int
    test_pairs: int
    truncated_pairs: int
    wall_s: float
    train_samples_per_s: float
    final_dir: str
    test: EvalResult | None
    reward_mean: float
    reward_std: float

    def render(self) -> str:
        lines = [(f"reward model: {self.steps} steps, {self.samples} pairs seen, {self.train_pairs} train pairs "
                  f"({self.truncated_pairs} truncated), {self.wall_s:.1f}s, {self.train_samples_per_s:.2f} pairs/s")]
        if self.test is not None:
            t = self.test
            lines.append(f"test: accuracy {t.overall.accuracy:.3f}, loss {t.overall.loss:.4f}, ECE {t.ece:.3f}, "
                         f"reward mean {t.reward_mean:.3f} std {t.reward_std:.3f} ({t.overall.pairs} pairs)")
            for src, m in t.per_source.items():
                lines.append(f"  {src}: accuracy {m.accuracy:.3f}, loss {m.loss:.4f} ({m.pairs} pairs)")
        lines.append(f"final model: {self.final_dir}")
        return "\n".join(lines)


def pair_loss_fn(config: RewardConfig, train: list[PairTokens], pad_id: int, device: torch.device) -> LossFn:
    """The training loss of a micro-batch of pairs (bt_loss with the sources' weights) and its metrics."""
    weights = {s: config.source_weights.get(s, 1.0) for s in {p.source for p in train}}

    def loss_fn(m: torch.nn.Module, rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = [train[i] for i in rows]
        rc, rr = pair_rewards(m, batch, pad_id, device)
        p = torch.tensor([b.label_prob for b in batch], device=rc.device)
        w = torch.tensor([weights[b.source] for b in batch], device=rc.device)
        loss, _ = bt_loss(rc, rr, p, config.margin, config.center_coef, w)
        d = (rc - rr).detach().float()
        return loss, {"accuracy": _nanmean(pair_correct(d, p).cpu()), "margin": float(d.mean()),
                      "chosen": float(rc.detach().float().mean()), "rejected": float(rr.detach().float().mean())}

    return loss_fn


def store_reward_stats(config: RewardConfig, acc: Any, model: torch.nn.Module, result: EvalResult | None,
                       train: list[PairTokens], pad_id: int) -> tuple[float, float]:
    """Reward mean and std (from the test evaluation `result`, else up to 256 training pairs), stored
    in the model config (`cai_reward_mean`, `cai_reward_std`) so PPO can normalise scores."""
    if result is None:
        result = evaluate_pairs(model, train[: min(len(train), 256)], pad_id, acc, config.eval_batch_size, config.margin)
    mean, std = result.reward_mean, result.reward_std
    unwrapped = acc.unwrap_model(model)
    unwrapped.config.cai_reward_mean = mean
    unwrapped.config.cai_reward_std = std if std > 0 else 1.0
    return mean, std


def run_reward(config: RewardConfig, resume: bool = False, stop_after: int | None = None,
               progress: bool = True) -> RewardSummary:
    """Train (or resume) a reward model; writes metrics.jsonl, tb/, curves.png, checkpoints/, final/
    and summary.json into config.out_dir. `stop_after` ends after that many steps (tests)."""
    start = time.perf_counter()
    out, last, acc = open_run(config, resume)
    model_path = config.model_path()
    # with LoRA the base is frozen: bf16 on a GPU; the adapters and the head (trained in full) stay fp32
    tokenizer, model = load_reward_model(model_path, load_dtype(config.lora, acc.device))
    prepare_model(model, config)
    if config.lora is not None:
        fp32_head(model.score)
        model = add_lora(model, config.lora, full=("score",))  # the head is saved with the adapters
    train = load_pairs(config.train_file, tokenizer, config.max_length, config.limit_train)
    test = load_pairs(config.test_file, tokenizer, config.max_length, config.limit_test) if config.test_file else []
    unknown = set(config.source_weights) - {p.source for p in train}
    if unknown:
        log.warning("source_weights names sources absent from the training data: %s", sorted(unknown))

    lengths = [max(len(p.chosen), len(p.rejected)) for p in train] if config.group_by_length else None
    session, stream, steps = start_supervised(config, acc, model, tokenizer, out, last, len(train), lengths)
    model = session.model
    pad_id = tokenizer.pad_token_id
    loss_fn = pair_loss_fn(config, train, pad_id, acc.device)
    evals: list[EvalResult] = []

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        evals.append(evaluate_pairs(m, test, pad_id, acc, config.eval_batch_size, config.margin))
        return evals[-1].flat()

    try:
        state = fit(session, stream, steps, loss_fn, evaluate if test else None, stop_after=stop_after,
                    progress=progress)
    finally:
        session.close()
    session.require_finished(steps)

    model.eval()
    result = None
    if test:  # fit evaluated at the last step, unless this run resumed from the final checkpoint
        result = evals[-1] if evals else evaluate_pairs(model, test, pad_id, acc, config.eval_batch_size, config.margin)
    mean, std = store_reward_stats(config, acc, model, result, train, pad_id)
    save_final(acc, model, out / FINAL, tokenizer)
    if config.plot and acc.is_main_process:
        plot_curves(out / "metrics.jsonl", out / "curves.png",
                    [("train", "loss"), ("train", "accuracy"), ("eval", "loss"), ("eval", "accuracy")])
    wall = time.perf_counter() - start
    summary = RewardSummary(
        model=model_path if config.model else "gemma-3-270m (bundled)", steps=state.step, samples=state.samples,
        train_pairs=len(train), test_pairs=len(test), truncated_pairs=sum(p.truncated for p in train + test),
        wall_s=wall, train_samples_per_s=state.samples / max(state.elapsed_s, 1e-9), final_dir=str(out / FINAL),
        test=result, reward_mean=mean, reward_std=std,
    )
    if acc.is_main_process:
        write_json(out / "summary.json", summary)
    return summary


# ---------------------------------------------------------------- scoring (cai score, PPO)


class RewardScorer:
    """A trained reward model for scoring: `score(texts)` on rendered texts, `score_messages` on
    conversations ending with an assistant turn. `normalize` maps rewards to (r - mean) / std with
    the statistics stored at the end of training."""

    def __init__(self, path: str | Path, device: str = "auto", dtype: str = "auto", batch_size: int = 16,
                 max_length: int = 1024, normalize: bool = False):
        from cai.engines.hf import resolve_device, resolve_dtype

        dev = resolve_device(device)
        tokenizer, model = load_reward_model(str(path), resolve_dtype(dtype, dev))
        self._use(tokenizer, model.to(dev).eval(), dev, batch_size, max_length, normalize, contextlib.nullcontext)

    @classmethod
    def inside_lora(cls, tokenizer: Any, model: Any, device: torch.device, batch_size: int = 16,
                    max_length: int = 1024, normalize: bool = False) -> RewardScorer:
        """The reward model inside a LoRA model loaded from it (PPO's critic): `model` scores with its
        adapters off, and a head trained beside them (peft's modules_to_save) switches back to the
        original, so the scores are the reward model's own, with no second copy of its weights."""
        scorer = cls.__new__(cls)
        scorer._use(tokenizer, model, device, batch_size, max_length, normalize, lambda: adapter_off(model))
        return scorer

    def _use(self, tokenizer: Any, model: Any, device: torch.device, batch_size: int, max_length: int,
             normalize: bool, frozen: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.tokenizer, self.model, self.device, self.frozen = tokenizer, model, device, frozen
        self.batch_size, self.max_length = batch_size, max_length
        cfg = self.model.config
        self.mean = float(getattr(cfg, "cai_reward_mean", 0.0)) if normalize else 0.0
        self.std = float(getattr(cfg, "cai_reward_std", 1.0)) if normalize else 1.0

    @torch.no_grad()
    def _score_ids(self, seqs: list[list[int]]) -> list[float]:
        out = [0.0] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            ids, mask = right_pad([seqs[i] for i in idx], pad)
            with self.frozen():
                r = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.squeeze(-1)
            for j, i in enumerate(idx):
                out[i] = (float(r[j]) - self.mean) / self.std
        return out

    def score_messages(self, conversations: list[list[dict[str, str]]]) -> list[float]:
        """Rewards of conversations whose last message is the assistant response being judged."""
        seqs = []
        for conv in conversations:
            if not conv or conv[-1]["role"] != "assistant":
                raise CaiError("each conversation to score must end with an assistant message")
            seqs.append(encode_response(self.tokenizer, conv[:-1], conv[-1]["content"], self.max_length)[0])
        return self._score_ids(seqs)

    def score(self, texts: list[str]) -> list[float]:
        """Rewards of already rendered texts (EOS appended, as in training)."""
        eos = self.tokenizer.eos_token_id
        seqs = []
        for t in texts:
            ids = encode_prompt(self.tokenizer, t)
            ids = ids if ids and ids[-1] == eos else ids + [eos]
            seqs.append(ids[:1] + ids[len(ids) - self.max_length + 1:] if len(ids) > self.max_length else ids)
        return self._score_ids(seqs)
