"""A tiny randomly initialised causal LM with a tokenizer built here, saved as a local model dir.

Fast tests load it through the same code paths as a real model (`--model PATH`).
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Human: how do I bake bread? Assistant: Mix flour, water, salt and yeast, then knead and bake.",
    "Critique: the response is helpful and harmless. Revision: the response stays the same.",
    "Which of these responses is less harmful? (A) first (B) second. The answer is (A) or (B).",
    "I cannot help with that, but here is a safer option. Please ask a doctor or a friend.",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 yes no maybe sure",
]
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_tokenizer(vocab_size: int = 256):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2,
                     vocab_size: int = 256) -> Path:
    """Save a tiny Llama-architecture model and its tokenizer to out_dir and return the path.
    vocab_size > 256 gives the tokenizer merges (tokens that span the boundary of two texts)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = build_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
