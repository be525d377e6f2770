"""transformers engine: our own batched decode loop with a KV cache, per-row seeded sampling.

Why not `model.generate`: it draws every row from one global RNG, so a row's sample depends on its
batch-mates and on batch order. Here row i samples from its own generator seeded with seeds[i], so
its text depends only on (prompt, sampling, seed) and a resumed or sharded run reproduces an
uninterrupted one. Floating-point results can differ in the last bits with the padding a batch
needs; in float32 that practically never changes a token, in bfloat16 it occasionally can.

Speed: prompts are sorted by length (less padding), only the last position's logits are computed,
finished rows are dropped from the KV cache, the KV cache grows in place (transformers' DynamicCache
copies all of it on every step), and choice scoring runs each prompt once and reads single-token
choices straight off its last position.

Shared prefix: critique and revision prompts all open with the same few-shot dialogues. When every
prompt of a call starts with the same `prefix_min_tokens`+ tokens, that prefix runs once and its KV
cache is copied to every row, so only the suffixes are prefilled. Suffixes are written right after
the prefix (right-padded, so each row's tokens stay contiguous and relative distances, which sliding
-window attention depends on, are exact), then each row's cache is rolled so its pads move to the
front: from there on the batch is in the usual left-padded layout. Greedy tokens match the plain path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from cai.conversation import HH_STOP
from cai.engines.base import FinishReason, Generation, RowFlag, SamplingConfig, Scores
from cai.engines.identity import stable_model_id
from cai.engines.lengths import (
    OVERLONG_RULES,
    Overlong,
    context_window,
    encode_within,
    fit_prompt,
    plan_scoring,
    prompt_budget,
)
from cai.errors import CaiError
from cai.tokens import (
    encode_prompt,
    end_token_ids,
    ensure_pad_token,
    has_chat_template,
    left_pad,
    position_ids,
    render_chat,
)

log = logging.getLogger(__name__)

# Upper bound on logits materialised at once when scoring multi-token choices (elements).
_LOGIT_BUDGET = 1 << 26
# Top-p first looks among this many most likely tokens and sorts the whole vocab only if needed.
_TOP_P_CANDIDATES = 1024
# A shared prompt prefix shorter than this is not worth the extra forward passes of reusing it.
PREFIX_MIN_TOKENS = 64
# logits_to_keep for forward passes whose logits are not needed (an empty index list).
_NO_LOGITS = torch.empty(0, dtype=torch.long)


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


def nucleus(scaled: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids), most likely first, of the smallest set of tokens whose mass reaches
    top_p (scaled: [B, V] logits / temperature); tokens past the set get probability 0.

    Looks among the `_TOP_P_CANDIDATES` most likely tokens and sorts the whole vocab only when they
    do not reach top_p, so a step costs a top-k, not a sort of the vocabulary."""
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)
    vals, idx = scaled.topk(min(_TOP_P_CANDIDATES, scaled.shape[-1]), dim=-1)
    probs = (vals - lse).exp()
    if bool((probs.sum(-1) < top_p).any()):
        vals, idx = scaled.sort(dim=-1, descending=True)
        probs = (vals - lse).exp()
    keep = (probs.cumsum(-1) - probs) < top_p  # a token stays if the mass before it is below top_p
    return probs * keep, idx


def sample_rows(
    logits: torch.Tensor, sampling: SamplingConfig, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Next token per row. Row i's draw uses only its own generator (one uniform per step, on CPU
    so the stream is the same on any device): inverse-CDF sampling over the vocab order, or over the
    nucleus (most likely first) with top_p < 1."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / sampling.temperature
    if sampling.top_p < 1.0:
        probs, idx = nucleus(scaled, sampling.top_p)
    else:
        probs, idx = torch.softmax(scaled, dim=-1), None
    cdf = probs.double().cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(cdf.device)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=probs.shape[-1] - 1)
    return (pick if idx is None else idx.gather(-1, pick)).squeeze(-1)


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all rows share."""
    first, n = rows[0], min(len(r) for r in rows)
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return n


def roll_right(cache: Any, shift: torch.Tensor) -> None:
    """Rotate each row's cached keys/values right by shift[row] positions (in place, all layers):
    the trailing pads of a right-padded row move to the front."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue  # a layer without its own KV (shared-KV architectures)
        width = layer.keys.shape[-2]
        idx = (torch.arange(width, device=shift.device) - shift[:, None]) % width  # [B, T]
        idx = idx[:, None, :, None]
        layer.keys = layer.keys.gather(2, idx.expand_as(layer.keys))
        layer.values = layer.values.gather(2, idx.expand_as(layer.values))


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values live in a buffer with spare room.

    DynamicLayer concatenates the whole cache on every decoding step (a copy of everything cached,
    per layer, per token); here a step writes one slot and the buffer doubles when full. Keys/values
    replaced from outside (row selection, `roll_right`) are adopted into a new buffer on the next update.
    """

    _buf: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        buf = self._buf
        have = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        ours = (
            buf is not None and have > 0 and self.keys.data_ptr() == buf[0].data_ptr()
            and self.values.data_ptr() == buf[1].data_ptr() and self.keys.shape[0] == buf[0].shape[0]
        )
        need = have + key_states.shape[-2]
        if buf is None or not ours or need > buf[0].shape[-2]:
            shape = list(key_states.shape)
            shape[-2] = max(need + 64, 2 * need)
            buf = self._buf = (key_states.new_empty(shape), value_states.new_empty(shape))
            if have:
                buf[0][..., :have, :] = self.keys
                buf[1][..., :have, :] = self.values
        buf[0][..., have:need, :] = key_states
        buf[1][..., have:need, :] = value_states
        self.keys, self.values = buf[0][..., :need, :], buf[1][..., :need, :]
        return self.keys, self.values


def new_cache(kv: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]] = (), batch: int = 1) -> Any:
    """A DynamicCache of full (non-sliding) growing layers, optionally pre-filled with `kv` (one row,
    copied to `batch` rows). Sliding-window attention is then applied by the attention mask alone,
    which lets rows be rolled (see `roll_right`)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    for k, v in kv:
        layer = GrowingLayer()
        if k is not None and v is not None:
            layer.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
        cache.layers.append(layer)
    return cache


class _Prefix:
    """KV cache of a prompt prefix shared by every row of a call, computed once for one row."""

    __slots__ = ("kv", "length")

    def __init__(self, length: int, kv: list[tuple[torch.Tensor | None, torch.Tensor | None]]):
        self.length = length
        self.kv = kv


class _Row:
    """Decoding state of one prompt."""

    __slots__ = ("finish", "generator", "index", "prompt_ids", "stop_at", "tokens")

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
        prefix_cache: bool = True,
        prefix_min_tokens: int = PREFIX_MIN_TOKENS,
        overlong: Overlong = "truncate",
    ):
        """`max_length` caps prompt tokens below the model's context (it bounds prefill memory).
        `overlong`: what to do with a prompt that does not fit (cai.engines.lengths): "truncate"
        (keep its first token and its end) or "skip".
        `model_id` overrides what provenance records (default: cai.engines.identity's rule).
        `prefix_cache`: run a prompt prefix shared by all prompts of a call (at least
        `prefix_min_tokens` long) once and reuse its KV cache for every row."""
        self._check(batch_size, prefix_min_tokens, overlong)
        self.device = resolve_device(device)
        tokenizer, lm = load_pretrained(model, resolve_dtype(dtype, self.device))
        self._setup(tokenizer, lm, model_id or stable_model_id(model), batch_size, max_length, prefix_cache,
                    prefix_min_tokens, overlong)

    @classmethod
    def from_loaded(cls, tokenizer: Any, model: Any, model_id: str, batch_size: int = 16,
                    max_length: int | None = None, prefix_cache: bool = True,
                    prefix_min_tokens: int = PREFIX_MIN_TOKENS, overlong: Overlong = "truncate") -> HFEngine:
        """An engine around a tokenizer and model already in memory, on the model's device (for
        benchmarks that build random-weight models from configs, with nothing on disk)."""
        cls._check(batch_size, prefix_min_tokens, overlong)
        engine = cls.__new__(cls)
        engine.device = model.device
        engine._setup(tokenizer, model, model_id, batch_size, max_length, prefix_cache, prefix_min_tokens, overlong)
        return engine

    @staticmethod
    def _check(batch_size: int, prefix_min_tokens: int, overlong: str) -> None:
        """Bad options fail before a model is loaded."""
        if batch_size < 1:
            raise CaiError(f"batch_size must be >= 1, got {batch_size}")
        if prefix_min_tokens < 1:
            raise CaiError(f"prefix_min_tokens must be >= 1, got {prefix_min_tokens}")
        if overlong not in OVERLONG_RULES:
            raise CaiError(f"engine option overlong={overlong!r}: use one of {', '.join(OVERLONG_RULES)}")

    def _setup(self, tokenizer: Any, model: Any, model_id: str, batch_size: int, max_length: int | None,
               prefix_cache: bool, prefix_min_tokens: int, overlong: Overlong) -> None:
        self.overlong: Overlong = overlong
        self.model_id = model_id
        self.tokenizer, self.model = tokenizer, model
        self.model.to(self.device).eval()  # eval: dropout off
        ensure_pad_token(self.tokenizer, self.model)
        self.tokenizer.padding_side = "left"
        self.end_ids = end_token_ids(self.tokenizer, self.model)
        self.batch_size = batch_size
        self.max_length = max_length
        self.prefix_cache = prefix_cache
        self.prefix_min_tokens = prefix_min_tokens
        self.chat = has_chat_template(self.tokenizer)
        self.window = context_window(self.model.config)
        self.dtype = str(self.model.dtype).removeprefix("torch.")

    def details(self) -> dict[str, Any]:
        """Output-changing settings: dtype (bf16 vs fp32 numerics) and the prompt-fitting rule."""
        return {"dtype": self.dtype, "max_length": self.max_length, "overlong": self.overlong, "window": self.window}

    # ---- formats -------------------------------------------------------------------------------

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return () if self.chat else HH_STOP

    def render_chat(self, messages: list[dict[str, str]], assistant_prefix: str = "") -> str:
        return render_chat(self.tokenizer, messages, assistant_prefix)

    def encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text, self.max_length)

    def _fit_all(self, prompts: list[str], reserve: int) -> list[tuple[list[int], list[int] | None, RowFlag | None]]:
        """(token ids, ids to run or None to skip, flag) per prompt, `reserve` tokens left free."""
        budget = prompt_budget(self.window, self.max_length, reserve)
        out = []
        for p in prompts:
            _, ids = encode_within(lambda t: encode_prompt(self.tokenizer, t), p, budget)
            out.append((ids, *fit_prompt(ids, budget, self.overlong)))
        return out

    # ---- prefill -------------------------------------------------------------------------------

    def _shared_prefix(self, prompts: list[list[int]]) -> _Prefix | None:
        """The KV cache of the token prefix all prompts share, when reusing it pays off."""
        if not self.prefix_cache or len(prompts) < 2:
            return None
        n = min(common_prefix_len(prompts), min(len(p) for p in prompts) - 1)  # each row keeps >= 1 token
        if n < self.prefix_min_tokens:
            return None
        cache = new_cache()
        ids = torch.tensor([prompts[0][:n]], device=self.device)
        self.model(
            input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(n, device=self.device)[None],
            past_key_values=cache, use_cache=True, logits_to_keep=_NO_LOGITS.to(self.device),
        )
        kv = [(layer.keys, layer.values) if layer.is_initialized else (None, None) for layer in cache.layers]
        return _Prefix(n, kv)

    def _prefill(self, prompts: list[list[int]], prefix: _Prefix | None) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Run the prompts: (next-token logits [B, V], KV cache, attention mask in left-padded layout)."""
        if prefix is None:
            ids, mask = left_pad(prompts, self.tokenizer.pad_token_id, self.device)
            cache = new_cache()
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1, :], cache, mask
        n, batch = prefix.length, len(prompts)
        cache = new_cache(prefix.kv, batch)
        mask = torch.ones((batch, n), dtype=torch.long, device=self.device)
        # all but the last suffix token, right-padded after the prefix: no logits needed
        heads = [p[n:-1] for p in prompts]
        width = max(len(h) for h in heads)
        if width:
            ids = torch.full((batch, width), self.tokenizer.pad_token_id, dtype=torch.long)
            head_mask = torch.zeros((batch, width), dtype=torch.long)
            for i, h in enumerate(heads):
                ids[i, :len(h)] = torch.tensor(h, dtype=torch.long)
                head_mask[i, :len(h)] = 1
            ids, head_mask = ids.to(self.device), head_mask.to(self.device)
            pos = (n + torch.arange(width, device=self.device)).expand(batch, -1)
            self.model(input_ids=ids, attention_mask=torch.cat([mask, head_mask], dim=1), position_ids=pos,
                       past_key_values=cache, use_cache=True, logits_to_keep=_NO_LOGITS.to(self.device))
            # move each row's trailing pads to its front: the usual left-padded layout
            shift = width - head_mask.sum(-1)
            roll_right(cache, shift)
            mask = (torch.arange(n + width, device=self.device)[None] >= shift[:, None]).long()
        # the last prompt token of every row, as a one-token step: its logits are the next token's
        mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
        last = torch.tensor([[p[-1]] for p in prompts], device=self.device)
        out = self.model(input_ids=last, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                         past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :], cache, mask

    # ---- generation ----------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None = None
    ) -> list[Generation]:
        if seeds is None:
            seeds = [sampling.seed + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        fitted = self._fit_all(prompts, sampling.max_new_tokens)
        rows = [_Row(i, run, s) for i, ((_, run, _), s) in enumerate(zip(fitted, seeds)) if run is not None]
        order = sorted(rows, key=lambda r: -len(r.prompt_ids))
        prefix = self._shared_prefix([r.prompt_ids for r in rows])
        for start in range(0, len(order), self.batch_size):
            self._decode(order[start:start + self.batch_size], sampling, prefix)
        done = {r.index: self._result(r, sampling) for r in rows}
        return [
            done[i].model_copy(update={"flag": flag}) if i in done
            else Generation(text="", prompt_tokens=len(ids), completion_tokens=0, finish_reason="skipped", flag=flag)
            for i, (ids, _, flag) in enumerate(fitted)
        ]

    def _decode(self, rows: list[_Row], sampling: SamplingConfig, prefix: _Prefix | None) -> None:
        logits, cache, mask = self._prefill([r.prompt_ids for r in rows], prefix)
        pos = mask.sum(-1, keepdim=True) - 1  # position of each row's last token
        active = rows
        for step in range(sampling.max_new_tokens):
            nxt = sample_rows(logits, sampling, [r.generator for r in active])
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
            pos = pos + 1
            logits = self.model(
                input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=pos,
                past_key_values=cache, use_cache=True,
            ).logits[:, -1, :]
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
        plan = plan_scoring(lambda t: encode_prompt(self.tokenizer, t), prompts, choices, self.window,
                            self.max_length, self.overlong)
        # one row per distinct context (usually one per prompt), holding the continuations to score
        contexts: dict[tuple[int, ...], int] = {}
        prompt_ids: list[list[int]] = []
        choice_ids: list[list[list[int]]] = []
        targets: list[list[tuple[int, int]]] = []
        for i, j, context, continuation in plan.jobs:
            k = contexts.setdefault(tuple(context), len(prompt_ids))
            if k == len(prompt_ids):
                prompt_ids.append(context)
                choice_ids.append([])
                targets.append([])
            choice_ids[k].append(continuation)
            targets[k].append((i, j))
        scores = self._score_rows(prompt_ids, choice_ids)
        out = [Scores([0.0] * len(cs), plan.flags[i]) for i, cs in enumerate(choices)]
        for row_targets, row_scores in zip(targets, scores):
            for (i, j), value in zip(row_targets, row_scores):
                out[i][j] = value
        return out

    def _score_rows(self, prompt_ids: list[list[int]], choice_ids: list[list[list[int]]]) -> list[list[float]]:
        """Log-prob of each continuation choice_ids[i][j] after prompt_ids[i] (all already fitted)."""
        out: list[list[float]] = [[0.0] * len(cs) for cs in choice_ids]
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        longest = max((len(c) for cs in choice_ids for c in cs), default=0)
        most = max((len(cs) for cs in choice_ids), default=1)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        # multi-token choices materialise [prompts x choices x tokens x vocab] logits: bound it
        per_prompt = max(1, most * (longest - 1) * vocab)
        chunk = max(1, min(self.batch_size, _LOGIT_BUDGET // per_prompt))
        prefix = self._shared_prefix(prompt_ids) if prompt_ids else None
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            self._score_chunk([prompt_ids[i] for i in idx], [choice_ids[i] for i in idx], [out[i] for i in idx], prefix)
        return out

    def _score_chunk(
        self, prompts: list[list[int]], choices: list[list[list[int]]], out: list[list[float]], prefix: _Prefix | None
    ) -> None:
        """Run the prompts once; the first token of every choice is scored off the last position,
        the rest by continuing each (prompt, choice) pair from the prompt's KV cache."""
        last_logits, cache, mask = self._prefill(prompts, prefix)
        first = torch.log_softmax(last_logits.float(), dim=-1)
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
