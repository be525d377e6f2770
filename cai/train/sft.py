"""Supervised fine-tuning on critique-revise output: the SL-CAI step.

Each row is a conversation that ends with the (revised) assistant response. Only that final
response is trained on: earlier assistant turns in red-team dialogues are the original, possibly
harmful, model replies, which is exactly what SL-CAI must not imitate. The prompt is rendered the
way generation renders it (the tokenizer's chat template, else the HH transcript format), and
the prompt and the response are tokenized separately, so the model learns the token boundary it
will actually see when it continues a prompt at sampling time.

Training (`run_sft`, `cai train sft`) uses the shared training core (cai.train.loop: config,
optimizer, schedule, checkpoints, exact resume, metrics, accelerate). The language-model head runs
only at positions that predict a labelled token: with a 262k vocabulary (Gemma) the head costs more
than the transformer body per token, and prompt positions carry no loss anyway.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cai.conversation import Message
from cai.errors import CaiError, InputError
from cai.stages.flag_filter import FLAG_NAMES
from cai.tokens import encode_completion, encode_prompt, ensure_pad_token, render_chat, right_pad
from cai.train.checkpoint import FINAL, save_final, write_json
from cai.train.config import TrainConfig
from cai.train.data import epoch_order
from cai.train.devices import dist_info
from cai.train.loop import fit, open_run, start_supervised
from cai.train.lora import add_lora
from cai.train.metrics import plot_curves
from cai.train.models import load_dtype, prepare_model

IGNORE = -100  # label of tokens that carry no loss


# ---------------------------------------------------------------- rows -> examples


class SFTExample(BaseModel):
    """A conversation to condition on and the assistant response to learn."""

    model_config = ConfigDict(extra="forbid")

    prompt: list[Message]
    response: str


def _messages(value: Any, path: str, line: int, field: str) -> list[Message]:
    if isinstance(value, str):
        return [Message(role="user", content=value)]
    if not isinstance(value, list):
        raise InputError(path, "expected a string or a list of messages", line=line, field=field)
    try:
        return [Message.model_validate(m) for m in value]
    except ValidationError as e:
        raise InputError(path, f"bad message: {e.errors()[0]['msg']}", line=line, field=field) from None


def row_to_example(row: dict[str, Any], path: str, line: int) -> SFTExample:
    """Accepts the exported `messages` form, `prompt`/`completion`, and raw critique-stage rows
    (`prompt` + `final_response`)."""
    if "messages" in row:
        msgs = _messages(row["messages"], path, line, "messages")
        if not msgs or msgs[-1].role != "assistant":
            raise InputError(path, "the conversation must end with an assistant message", line=line, field="messages")
        prompt, response = msgs[:-1], msgs[-1].content
    elif "prompt" in row and ("completion" in row or "final_response" in row):
        prompt = _messages(row["prompt"], path, line, "prompt")
        if "final_response" in row:
            response = row["final_response"]
        elif isinstance(row["completion"], str):
            response = row["completion"]
        else:
            completion = _messages(row["completion"], path, line, "completion")
            if len(completion) != 1 or completion[0].role != "assistant":
                raise InputError(path, "expected one assistant message", line=line, field="completion")
            response = completion[0].content
    else:
        raise InputError(
            path, "expected `messages`, `prompt` + `completion`, or `prompt` + `final_response`", line=line
        )
    if not any(m.role == "user" for m in prompt):
        raise InputError(path, "the prompt has no user message", line=line)
    if not isinstance(response, str):
        raise InputError(path, "the response must be a string", line=line)
    return SFTExample(prompt=prompt, response=response)


def load_examples(path: str | Path, drop_flags: tuple[str, ...] = ()) -> tuple[list[SFTExample], Counter[str]]:
    """All examples of a JSONL (.gz), parquet or other datasets-loadable file, and the count of rows
    left out per reason: `empty` (an empty response) or `flag:<name>` (a flag listed in
    `drop_flags`, the rule of cai.stages.flag_filter). A repeated row id keeps its first row."""
    from cai.stages.flag_filter import count_key, drop_reason, row_flags
    from cai.stages.inputs import iter_rows
    from cai.store import unique_ids

    p = Path(path)
    examples: list[SFTExample] = []
    skipped: Counter[str] = Counter()
    for line, row in unique_ids(iter_rows(p), p):
        flag = drop_reason(row_flags(row), drop_flags)
        ex = row_to_example(row, str(p), line)
        if flag is not None:
            skipped[count_key(flag)] += 1
        elif ex.response.strip():
            examples.append(ex)
        else:
            skipped["empty"] += 1
    if not examples:
        raise InputError(str(p), "no training examples in file" + (f" (left out: {dict(skipped)})" if skipped else ""))
    return examples, skipped


# ---------------------------------------------------------------- tokenization, packing, collation


class Tokenized(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt, the token id on the response (and its EOS)


def tokenize_example(tokenizer: Any, example: SFTExample, max_length: int) -> Tokenized | None:
    """Prompt ids (no loss) + response ids + EOS (loss); cut on the right at max_length.

    Returns None when the prompt alone leaves no room for a response token.
    """
    messages = [m.model_dump() for m in example.prompt]
    prompt_ids = encode_prompt(tokenizer, render_chat(tokenizer, messages))
    response_ids = encode_completion(tokenizer, messages, example.response)
    if len(prompt_ids) >= max_length:
        return None
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
    return Tokenized(input_ids=ids, labels=labels)


def pack(examples: list[Tokenized], max_length: int) -> list[list[Tokenized]]:
    """Greedily fill rows of at most max_length tokens, in order; each example stays whole."""
    rows: list[list[Tokenized]] = []
    used = max_length + 1
    for ex in examples:
        n = len(ex.input_ids)
        if used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += n
    return rows


def collate(rows: list[list[Tokenized]], pad_id: int) -> dict[str, torch.Tensor | None]:
    """A right-padded batch. Rows holding several packed examples get position ids that restart at
    each example and no attention mask: transformers then builds a block-diagonal causal mask from
    the position ids, so packed examples never attend to each other."""
    packed = any(len(r) > 1 for r in rows)
    ids, attention = right_pad([[t for ex in r for t in ex.input_ids] for r in rows], pad_id)
    labels, _ = right_pad([[t for ex in r for t in ex.labels] for r in rows], IGNORE)
    width = ids.shape[1]
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        start = 0
        for ex in r:
            n = len(ex.input_ids)
            positions[i, start:start + n] = torch.arange(n)
            start += n
        positions[i, start:] = torch.arange(width - start)  # padding: a separate dummy sequence
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": None if packed else attention,
        "position_ids": positions,
    }


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the labelled (response) tokens of the batch, and their count."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    n = int((shift_labels != IGNORE).sum())
    total = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return total / max(n, 1), n


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor | None]) -> tuple[torch.Tensor, int]:
    """`sft_loss` of a collated batch, with the LM head run only where it predicts a labelled token
    (the union over the batch's rows of positions t whose label t + 1 is set)."""
    labels = batch["labels"]
    assert labels is not None
    keep = (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)
    if keep.numel() == 0:
        return torch.zeros((), device=labels.device, requires_grad=True), 0
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
        logits_to_keep=keep, use_cache=False,
    ).logits
    targets = labels[:, keep + 1]
    n = int((targets != IGNORE).sum())
    total = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return total / max(n, 1), n


# ---------------------------------------------------------------- the trainer


class SFTConfig(TrainConfig):
    """`cai train sft` config: the shared TrainConfig fields plus data settings."""

    train_file: str = Field(description="critique-revise output (`cai generate`) or rows with `messages`")
    test_file: str | None = Field(None, description="held-out rows in the same formats")
    test_size: float = Field(0.0, ge=0.0, lt=1.0, description="hold out this share of train_file (no test_file)")
    max_length: int = Field(512, ge=8, description="tokens per example; longer responses are cut on the right")
    packing: bool = Field(False, description="pack several examples into rows of max_length tokens")
    group_by_length: bool = Field(True, description="batch examples of similar length together (no packing)")
    eval_batch_size: int = Field(8, ge=1)
    limit_train: int | None = Field(None, ge=1, description="use only the first N training rows")
    drop_flags: list[str] = Field(default_factory=list,
                                       description="leave out rows with any of these flags set (e.g. copied_few_shot)")

    @model_validator(mode="after")
    def _split(self) -> SFTConfig:
        if self.test_file is not None and self.test_size > 0:
            raise ValueError("set test_file or test_size, not both")
        unknown = [f for f in self.drop_flags if f not in FLAG_NAMES]
        if unknown:
            raise ValueError(f"unknown flag {unknown[0]!r} in drop_flags; the flags are: {', '.join(FLAG_NAMES)}")
        return self


class SFTSummary(BaseModel):
    model: str
    steps: int
    samples: int
    train_examples: int
    test_examples: int
    skipped_empty: int = Field(description="rows with an empty response")
    dropped_flagged: dict[str, int] = Field(default_factory=dict, description="rows left out by drop_flags, per flag")
    skipped_long_prompt: int = Field(description="examples whose prompt alone fills max_length")
    train_rows: int = Field(description="rows per epoch (packed rows when packing)")
    train_tokens: int = Field(description="response (loss) tokens per epoch")
    wall_s: float
    train_samples_per_s: float
    test_loss_before: float | None
    test_loss_after: float | None
    final_dir: str

    def render(self) -> str:
        lines = [(f"SFT: {self.steps} steps, {self.samples} rows seen, {self.train_examples} train examples "
                 f"({self.train_rows} rows, {self.train_tokens} response tokens per epoch), {self.wall_s:.1f}s, "
                 f"{self.train_samples_per_s:.2f} rows/s")]
        if self.skipped_empty or self.skipped_long_prompt:
            lines.append(f"skipped: {self.skipped_empty} empty responses, {self.skipped_long_prompt} prompts over max_length")
        if self.dropped_flagged:
            lines.append("left out by drop_flags: " + ", ".join(f"{k} {v}" for k, v in self.dropped_flagged.items()))
        if self.test_loss_after is not None:
            before = f"{self.test_loss_before:.4f} -> " if self.test_loss_before is not None else ""
            lines.append(f"test loss ({self.test_examples} examples): {before}{self.test_loss_after:.4f}")
        lines.append(f"final model: {self.final_dir}")
        return "\n".join(lines)


def _split_examples(config: SFTConfig) -> tuple[list[SFTExample], list[SFTExample], Counter[str]]:
    drop = tuple(config.drop_flags)
    train, skipped = load_examples(config.train_file, drop)
    train = train[: config.limit_train]
    if config.test_file is not None:
        test, more = load_examples(config.test_file, drop)
        return train, test, skipped + more
    if config.test_size > 0:
        order = epoch_order(len(train), config.seed, -1)
        n_test = max(1, round(config.test_size * len(train)))
        if n_test >= len(train):
            raise CaiError(f"test_size {config.test_size} leaves no training rows out of {len(train)}")
        held = set(order[:n_test])
        return [e for i, e in enumerate(train) if i not in held], [train[i] for i in sorted(held)], skipped
    return train, [], skipped


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, rows: list[list[Tokenized]], pad_id: int, accelerator: Any,
                  batch_size: int) -> float:
    """Token-weighted mean loss over all rows (split across processes, gathered)."""
    from accelerate.utils import gather_object

    rank, world = dist_info(accelerator)
    mine = sorted(range(rank, len(rows), world), key=lambda i: -sum(len(e.input_ids) for e in rows[i]))
    sums: list[tuple[float, int]] = []
    for start in range(0, len(mine), batch_size):
        batch = _to(collate([rows[i] for i in mine[start:start + batch_size]], pad_id), accelerator.device)
        loss, n = lm_loss(model, batch)
        sums.append((float(loss) * n, n))
    if world > 1:
        sums = gather_object(sums)
    total = sum(n for _, n in sums)
    return sum(s for s, _ in sums) / max(total, 1)


def _to(batch: dict[str, torch.Tensor | None], device: torch.device) -> dict[str, torch.Tensor | None]:
    return {k: None if v is None else v.to(device) for k, v in batch.items()}


def run_sft(config: SFTConfig, resume: bool = False, stop_after: int | None = None,
            progress: bool = True) -> SFTSummary:
    """Fine-tune (or resume) a causal LM on the final assistant turns; writes metrics.jsonl, tb/,
    curves.png, checkpoints/, final/ and summary.json into config.out_dir."""
    from cai.engines.hf import load_pretrained

    start = time.perf_counter()
    out, last, acc = open_run(config, resume)
    train_ex, test_ex, skipped = _split_examples(config)  # before the model: a bad file fails in a second
    model_path = config.model_path()
    # with LoRA the base is frozen: bf16 on a GPU (the adapters stay fp32)
    tokenizer, model = load_pretrained(model_path, load_dtype(config.lora, acc.device))
    ensure_pad_token(tokenizer, model)
    prepare_model(model, config)
    if config.lora is not None:
        model = add_lora(model, config.lora)
    tokenized = [tokenize_example(tokenizer, e, config.max_length) for e in train_ex]
    train_tok = [t for t in tokenized if t is not None]
    test_tok = [t for t in (tokenize_example(tokenizer, e, config.max_length) for e in test_ex) if t is not None]
    if not train_tok:
        raise CaiError(f"{config.train_file}: every prompt is longer than max_length {config.max_length}")
    rows = pack(train_tok, config.max_length) if config.packing else [[t] for t in train_tok]
    test_rows = [[t] for t in test_tok]

    lengths = [sum(len(e.input_ids) for e in r) for r in rows] if config.group_by_length and not config.packing else None
    session, stream, steps = start_supervised(config, acc, model, tokenizer, out, last, len(rows), lengths)
    model, state = session.model, session.state
    pad_id = tokenizer.pad_token_id

    def loss_fn(m: torch.nn.Module, idx: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, n = lm_loss(m, _to(collate([rows[i] for i in idx], pad_id), acc.device))
        return loss, {"tokens": float(n)}

    evals: dict[int, float] = {}  # optimizer step -> held-out loss

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        loss = evals[state.step] = evaluate_loss(m, test_rows, pad_id, acc, config.eval_batch_size)
        return {"loss": loss, "perplexity": float(torch.exp(torch.tensor(min(loss, 50.0))))}

    try:
        if test_rows and state.step == 0:  # the starting point, kept in checkpoints for the summary
            model.eval()
            first = evaluate(model)
            state.extra["test_loss_before"] = first["loss"]
            session.log("eval", first, step=0)
        state = fit(session, stream, steps, loss_fn, evaluate if test_rows else None, stop_after=stop_after,
                    progress=progress)
    finally:
        session.close()
    session.require_finished(steps)
    model.eval()
    after = None
    if test_rows:  # fit evaluated the last step, unless this run resumed from the final checkpoint
        after = evals[state.step] if state.step in evals else evaluate(model)["loss"]
    save_final(acc, model, out / FINAL, tokenizer)
    if config.plot and acc.is_main_process:
        plot_curves(out / "metrics.jsonl", out / "curves.png", [("train", "loss"), ("eval", "loss")])
    summary = SFTSummary(
        model=model_path if config.model else "gemma-3-270m (bundled)", steps=state.step, samples=state.samples,
        train_examples=len(train_tok), test_examples=len(test_tok), skipped_empty=skipped["empty"],
        dropped_flagged={k: v for k, v in sorted(skipped.items()) if k != "empty"},
        skipped_long_prompt=len(tokenized) - len(train_tok), train_rows=len(rows),
        train_tokens=sum(sum(x != IGNORE for x in e.labels) for e in train_tok),
        wall_s=time.perf_counter() - start, train_samples_per_s=state.samples / max(state.elapsed_s, 1e-9),
        test_loss_before=state.extra.get("test_loss_before"), test_loss_after=after, final_dir=str(out / FINAL),
    )
    if acc.is_main_process:
        write_json(out / "summary.json", summary)
    return summary
