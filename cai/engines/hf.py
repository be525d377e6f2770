"""transformers engine: our own batched decode loop with a KV cache, per-row seeded sampling.

Why not `model.generate`: it draws every row from one global RNG, so a row's sample depends on its
batch-mates and on batch order. Here row i samples from its own generator seeded with seeds[i], so
its text depends only on (prompt, sampling, seed) and a resumed or sharded run reproduces an
uninterrupted one. Floating-point results can differ in the last bits with the padding a batch
needs; in float32 that practically never changes a token, in bfloat16 it occasionally can.

Speed: prompts are sorted by length (less padding), only the last position's logits are computed,
finished rows are dropped from the KV cache, and choice scoring runs each prompt once and reads
single-token choices straight off its last position.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cai.conversation import HH_STOP, to_hh
from cai.engines.base import FinishReason, Generation, SamplingConfig
from cai.errors import CaiError

log = logging.getLogger(__name__)

# Special tokens that end a turn in common chat templates; treated as EOS when the vocab has them.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")
# Upper bound on logits materialised at once when scoring multi-token choices (elements).
_LOGIT_BUDGET = 1 << 26
# Top-p first looks among this many most likely tokens and sorts the whole vocab only if needed.
_TOP_P_CANDIDATES = 1024


def resolve_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bfloat16 matmul (AVX512-BF16 or AMX), where bf16 beats fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 where the hardware runs it fast (CUDA with bf16, CPUs with AVX512-BF16/AMX), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise CaiError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return value
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def model_not_found(model: str, cause: BaseException) -> CaiError:
    return CaiError(
        f"cannot load model {model!r}: it is neither a local model directory nor a model in the "
        f"local Hugging Face cache ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}). "
        "cai never downloads models itself. Pass --model with a local directory that holds config.json, "
        "the weights and the tokenizer; or, on a machine with internet, run "
        f"`huggingface-cli download {model}` and point HF_HOME at that cache here; or leave out "
        "--model to use the bundled Gemma 3 270M."
    )


def load_pretrained(model: str | Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Tokenizer and causal LM from a local directory or the local hub cache (never the network)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(model)
    local_only = not Path(source).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise model_not_found(source, e) from e
    return tokenizer, lm


def ensure_pad_token(tokenizer: Any, model: Any) -> None:
    """Give the tokenizer a pad token distinct from EOS, so trainers can tell padding from a real end.

    Reuses <unk> when there is one (no new embedding row needed); otherwise adds "<pad>" and grows
    the embeddings. Pad positions are always masked, so the new row never changes a result.
    """
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        log.info("tokenizer has no pad token distinct from EOS: using unk %r as pad", tokenizer.unk_token)
        tokenizer.pad_token = tokenizer.unk_token
    else:
        log.info("tokenizer has no pad token distinct from EOS: adding '<pad>'")
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id


def end_token_ids(tokenizer: Any, model: Any) -> set[int]:
    """Token ids that end a completion: EOS, the generation config's EOS ids, end-of-turn tokens."""
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = gen_eos if isinstance(gen_eos, (list, tuple, set)) else [gen_eos]
    return turn_end_ids(tokenizer) | {i for i in extra if i is not None}


def encode_prompt(tokenizer: Any, text: str, max_length: int | None = None) -> list[int]:
    """Prompt ids; adds BOS etc. unless the text already starts with BOS (chat templates write it).
    Over `max_length`, keeps the first token (BOS) and the last ones (the turn being answered)."""
    bos = tokenizer.bos_token
    ids = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
    if max_length is not None and len(ids) > max_length:
        log.warning("prompt of %d tokens cut to %d (max_length)", len(ids), max_length)
        ids = ids[:1] + ids[len(ids) - max_length + 1:]
    return ids


def turn_end_ids(tokenizer: Any) -> set[int]:
    """EOS plus the end-of-turn tokens of common chat templates that this vocab has."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id, *(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)}
    return {i for i in ids if i is not None}


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, messages: list[dict[str, str]], assistant_prefix: str = "") -> str:
    """The tokenizer's chat template (opening the assistant turn) + prefix; HH transcript without one."""
    if not has_chat_template(tokenizer):
        return to_hh(messages, assistant_prefix)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + assistant_prefix


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """0 at each row's first real token whatever its left padding (pads get 0, they are masked)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose mass reaches top_p (probs: [B, V], rows sum to 1)."""
    k = min(_TOP_P_CANDIDATES, probs.shape[-1])
    vals, idx = probs.topk(k, dim=-1)
    if bool((vals.sum(-1) < top_p).any()):
        vals, idx = probs.sort(dim=-1, descending=True)
    keep = (vals.cumsum(-1) - vals) < top_p  # a token stays if the mass before it is below top_p
    return torch.zeros_like(probs).scatter_(-1, idx, vals * keep)


def sample_rows(
    logits: torch.Tensor, sampling: SamplingConfig, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Next token per row. Row i's draw uses only its own generator (one uniform per step, on CPU
    so the stream is the same on any device): inverse-CDF sampling over the vocab order."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        probs = nucleus(probs, sampling.top_p)
    cdf = probs.double().cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(cdf.device)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


class _Row:
    """Decoding state of one prompt."""

    __slots__ = ("index", "prompt_ids", "generator", "tokens", "finish", "stop_at")

    def __init__(self, index: int, prompt_ids: list[int], seed: int):
        self.index = index
        self.prompt_ids = prompt_ids
        self.generator = torch.Generator().manual_seed(int(seed))
        self.tokens: list[int] = []
        self.finish: FinishReason | None = None
        self.stop_at = -1  # character offset of the stop sequence in the decoded text


class HFEngine:
    """A transformers causal LM behind the Engine protocol (see cai.engines.base)."""

    name = "hf"

    def __init__(
        self,
        model: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        max_length: int | None = None,
        model_id: str | None = None,
    ):
        """`max_length` caps prompt tokens: longer prompts keep their first (BOS) and last tokens.
        `model_id` overrides what provenance records (default: `model` as given)."""
        if batch_size < 1:
            raise CaiError(f"batch_size must be >= 1, got {batch_size}")
        self.model_id = model_id or str(model)
        self.device = resolve_device(device)
        self.tokenizer, self.model = load_pretrained(model, resolve_dtype(dtype, self.device))
        self.model.to(self.device).eval()  # eval: dropout off
        ensure_pad_token(self.tokenizer, self.model)
        self.tokenizer.padding_side = "left"
        self.end_ids = end_token_ids(self.tokenizer, self.model)
        self.batch_size = batch_size
        self.max_length = max_length
        self.chat = has_chat_template(self.tokenizer)

    # ---- formats -------------------------------------------------------------------------------

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return () if self.chat else HH_STOP

    def render_chat(self, messages: list[dict[str, str]], assistant_prefix: str = "") -> str:
        return render_chat(self.tokenizer, messages, assistant_prefix)

    def encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text, self.max_length)

    # ---- generation ----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None = None
    ) -> list[Generation]:
        if seeds is None:
            seeds = [sampling.seed + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        rows = [_Row(i, self.encode(p), s) for i, (p, s) in enumerate(zip(prompts, seeds))]
        order = sorted(rows, key=lambda r: -len(r.prompt_ids))
        for start in range(0, len(order), self.batch_size):
            self._decode(order[start:start + self.batch_size], sampling)
        return [self._result(r, sampling) for r in rows]

    def _decode(self, rows: list[_Row], sampling: SamplingConfig) -> None:
        ids, mask = left_pad([r.prompt_ids for r in rows], self.tokenizer.pad_token_id, self.device)
        pos = position_ids(mask)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        active = rows
        for step in range(sampling.max_new_tokens):
            nxt = sample_rows(out.logits[:, -1, :], sampling, [r.generator for r in active])
            for r, tok in zip(active, nxt.tolist()):
                r.tokens.append(tok)
                if tok in self.end_ids:
                    r.finish = "eos"
                elif sampling.stop:
                    self._check_stop(r, sampling.stop)
            if step == sampling.max_new_tokens - 1:
                break
            keep = [j for j, r in enumerate(active) if r.finish is None]
            if not keep:
                break
            if len(keep) < len(active):
                sel = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(sel)
                mask, pos, nxt = mask[sel], pos[sel], nxt[sel]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            pos = pos[:, -1:] + 1
            out = self.model(
                input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=pos,
                past_key_values=cache, use_cache=True,
            )
        for r in active:
            if r.finish is None:
                r.finish = "length"

    def _check_stop(self, row: _Row, stop: tuple[str, ...]) -> None:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        if hits:
            row.finish, row.stop_at = "stop", min(hits)

    def _result(self, row: _Row, sampling: SamplingConfig) -> Generation:
        tokens = row.tokens[:-1] if row.finish == "eos" else row.tokens
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if row.finish == "stop":
            text = text[:row.stop_at]
        return Generation(
            text=text, prompt_tokens=len(row.prompt_ids), completion_tokens=len(row.tokens),
            finish_reason=row.finish or "length",
        )

    # ---- scoring -------------------------------------------------------------------------------

    @torch.inference_mode()
    def choice_logprobs(self, prompts: list[str], choices: list[list[str]]) -> list[list[float]]:
        if len(prompts) != len(choices):
            raise ValueError(f"{len(choices)} choice lists for {len(prompts)} prompts")
        prompt_ids = [self.encode(p) for p in prompts]
        choice_ids = [[self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in cs] for cs in choices]
        out: list[list[float]] = [[0.0] * len(cs) for cs in choices]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompt_ids[i]))
        longest = max((len(c) for cs in choice_ids for c in cs), default=0)
        most = max((len(cs) for cs in choice_ids), default=1)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        # multi-token choices materialise [prompts x choices x tokens x vocab] logits: bound it
        per_prompt = max(1, most * (longest - 1) * vocab)
        chunk = max(1, min(self.batch_size, _LOGIT_BUDGET // per_prompt))
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            self._score_chunk([prompt_ids[i] for i in idx], [choice_ids[i] for i in idx], [out[i] for i in idx])
        return out

    def _score_chunk(self, prompts: list[list[int]], choices: list[list[list[int]]], out: list[list[float]]) -> None:
        """Run the prompts once; the first token of every choice is scored off the last position,
        the rest by continuing each (prompt, choice) pair from the prompt's KV cache."""
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id, self.device)
        pos = position_ids(mask)
        res = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(res.logits[:, -1, :].float(), dim=-1)
        tails: list[tuple[int, int]] = []
        for i, cs in enumerate(choices):
            for j, c in enumerate(cs):
                if c:
                    out[i][j] = float(first[i, c[0]])
                if len(c) > 1:
                    tails.append((i, j))
        if not tails:
            return
        rows = torch.tensor([i for i, _ in tails], device=self.device)
        cache = res.past_key_values
        cache.batch_select_indices(rows)
        conts = [choices[i][j] for i, j in tails]
        width = max(len(c) for c in conts) - 1
        cont_ids = torch.full((len(tails), width), self.tokenizer.pad_token_id, dtype=torch.long)
        cont_mask = torch.zeros((len(tails), width), dtype=torch.long)
        for k, c in enumerate(conts):  # right-padded: causal attention never looks at the pads
            cont_ids[k, :len(c) - 1] = torch.tensor(c[:-1])
            cont_mask[k, :len(c) - 1] = 1
        cont_ids, cont_mask = cont_ids.to(self.device), cont_mask.to(self.device)
        start = mask[rows].sum(-1, keepdim=True)
        cont_pos = start + torch.arange(width, device=self.device)
        logits = self.model(
            input_ids=cont_ids, attention_mask=torch.cat([mask[rows], cont_mask], dim=1),
            position_ids=cont_pos, past_key_values=cache, use_cache=True,
        ).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        for k, ((i, j), c) in enumerate(zip(tails, conts)):
            targets = torch.tensor(c[1:], device=self.device)
            out[i][j] += float(logp[k, torch.arange(len(c) - 1, device=self.device), targets].sum())
