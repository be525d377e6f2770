"""The one home of tokenizing, chat rendering and padding, for the engines and the trainers.

Why one module: generation, RM training, SFT and PPO must see a conversation as the very same token
ids, or a policy is trained on one boundary and sampled on another, and a reward model scores text
laid out differently from what it learned. So each rule lives here once:
- rendering: the tokenizer's chat template (opening the assistant turn), else the HH transcript;
- a prompt gets BOS unless the rendered text already starts with it (chat templates write it), and
  an over-long prompt keeps its first token (BOS) and its last ones (the turn being answered);
- a completion is the text that follows the rendered prompt, tokenized on its own, so the trainers
  learn the token boundary that sampling produces;
- pad tokens are distinct from EOS, so padding is never mistaken for a real end;
- left padding (generation: every row's next token at the last column) with position ids that
  start at 0 on each row's first real token; right padding (training batches: a row's tokens keep
  their columns).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from cai.conversation import to_hh
from cai.errors import CaiError

log = logging.getLogger(__name__)

# Special tokens that end a turn in common chat templates; treated as EOS when the vocab has them.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


# ---------------------------------------------------------------- chat rendering


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, messages: list[dict[str, str]], assistant_prefix: str = "") -> str:
    """The text a model continues to answer as the assistant after `messages`: the tokenizer's chat
    template (opening the assistant turn) + prefix; the HH transcript without a template."""
    if not has_chat_template(tokenizer):
        return to_hh(messages, assistant_prefix)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + assistant_prefix


def render_completion(tokenizer: Any, messages: list[dict[str, str]], response: str) -> str:
    """The text that follows `render_chat(messages)` when the assistant says `response`."""
    if not has_chat_template(tokenizer):
        return " " + response.strip()
    prefix = render_chat(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prefix):
        raise CaiError(
            "the tokenizer's chat template renders the conversation differently with and without the "
            "final assistant turn, so the response tokens cannot be isolated; use a model whose template "
            "only appends the assistant turn"
        )
    return full[len(prefix):]


# ---------------------------------------------------------------- token ids


def encode_prompt(tokenizer: Any, text: str, max_length: int | None = None) -> list[int]:
    """Prompt ids; adds BOS etc. unless the text already starts with BOS (chat templates write it).
    Over `max_length`, keeps the first token (BOS) and the last ones (the turn being answered)."""
    bos = getattr(tokenizer, "bos_token", None)
    ids = list(tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])
    if max_length is not None and len(ids) > max_length:
        log.warning("prompt of %d tokens cut to %d (max_length)", len(ids), max_length)
        ids = ids[:1] + ids[len(ids) - max_length + 1:]
    return ids


def encode_completion(tokenizer: Any, messages: list[dict[str, str]], response: str) -> list[int]:
    """Ids of the response that follows the rendered prompt, ending with EOS."""
    ids = list(tokenizer(render_completion(tokenizer, messages, response), add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return ids


def turn_end_ids(tokenizer: Any) -> set[int]:
    """EOS plus the end-of-turn tokens of common chat templates that this vocab has."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id, *(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)}
    return {i for i in ids if i is not None}


def end_token_ids(tokenizer: Any, model: Any) -> set[int]:
    """Token ids that end a completion: EOS, the generation config's EOS ids, end-of-turn tokens."""
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = gen_eos if isinstance(gen_eos, (list, tuple, set)) else [gen_eos]
    return turn_end_ids(tokenizer) | {i for i in extra if i is not None}


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


# ---------------------------------------------------------------- padding


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask, each row's tokens at the right end (generation layout)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask, each row's tokens from column 0 (training layout); T is the
    longest row, or `width` when given."""
    width = max(len(r) for r in rows) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """0 at each row's first real token whatever its left padding (pads get 0, they are masked)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
