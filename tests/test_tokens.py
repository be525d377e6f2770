"""cai.tokens, the one home of rendering, encoding and padding: values checked by hand."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from cai.conversation import to_hh
from cai.tokens import (
    encode_completion,
    encode_prompt,
    left_pad,
    position_ids,
    render_chat,
    right_pad,
)

MESSAGES = [{"role": "user", "content": "how do I bake bread?"}]


def test_padding_layouts_and_position_ids():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    ids, mask = right_pad([[5, 6, 7], [8], []], pad_id=-1)
    assert ids.tolist() == [[5, 6, 7], [8, -1, -1], [-1, -1, -1]] and mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert right_pad([[1]], 0, width=3)[0].tolist() == [[1, 0, 0]]


def test_prompt_keeps_its_first_and_last_tokens_and_completion_ends_with_eos(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = render_chat(tok, MESSAGES)
    assert text == to_hh(MESSAGES, "")  # no chat template: the HH transcript
    full = encode_prompt(tok, text)
    assert encode_prompt(tok, tok.bos_token + text) == [tok.bos_token_id] + full  # a written BOS is kept, once
    cut = encode_prompt(tok, text, max_length=5)
    assert cut == full[:1] + full[-4:]
    reply = encode_completion(tok, MESSAGES, "Mix flour.")
    assert reply[-1] == tok.eos_token_id and tok.decode(reply[:-1]) == " Mix flour."
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert render_chat(tok, MESSAGES, "Sure") == "<user>how do I bake bread?<assistant>Sure"
