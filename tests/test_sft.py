"""SFT data: which tokens carry loss, the loss value, packing, input formats."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cai.conversation import Message, to_hh
from cai.errors import InputError
from cai.train.sft import (
    IGNORE,
    SFTExample,
    Tokenized,
    collate,
    load_examples,
    pack,
    sft_loss,
    tokenize_example,
)

PROMPT = [{"role": "user", "content": "how do I bake bread?"}]
DIALOGUE = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "the quick brown fox"},  # an earlier turn: context, no loss
    {"role": "user", "content": "how do I bake bread?"},
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def example(prompt, response="Mix flour, water and salt."):
    return SFTExample(prompt=[Message(**m) for m in prompt], response=response)


def test_labels_are_ignore_exactly_on_the_prompt(tok):
    ex = tokenize_example(tok, example(DIALOGUE), max_length=512)
    prompt_ids = tok(to_hh(DIALOGUE, assistant_prefix=""))["input_ids"]
    response_ids = tok(" Mix flour, water and salt.", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == prompt_ids + response_ids + [tok.eos_token_id]
    assert ex.labels == [IGNORE] * len(prompt_ids) + response_ids + [tok.eos_token_id]
    # the earlier assistant turn is inside the prompt, so none of its tokens is labelled
    assert all(label == IGNORE for label in ex.labels[: len(prompt_ids)])


def test_truncation_keeps_the_prompt_and_drops_prompts_that_do_not_fit(tok):
    n_prompt = len(tok(to_hh(PROMPT, assistant_prefix=""))["input_ids"])
    ex = tokenize_example(tok, example(PROMPT), max_length=n_prompt + 3)
    assert len(ex.input_ids) == n_prompt + 3
    assert sum(label != IGNORE for label in ex.labels) == 3
    assert tokenize_example(tok, example(PROMPT), max_length=n_prompt) is None


def test_chat_template_isolates_the_assistant_turn(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    ex = tokenize_example(tok, example(PROMPT, "yes"), max_length=512)
    prompt_ids = tok("<user>how do I bake bread?</s><assistant>")["input_ids"]
    completion_ids = tok("yes</s>", add_special_tokens=False)["input_ids"]
    assert ex.labels == [IGNORE] * len(prompt_ids) + completion_ids + [tok.eos_token_id]


def test_loss_equals_hand_computation():
    a = Tokenized(input_ids=[5, 6, 7, 8], labels=[IGNORE, IGNORE, 7, 8])
    b = Tokenized(input_ids=[5, 9, 3], labels=[IGNORE, 9, 3])
    batch = collate([[a], [b]], pad_id=0)
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 7, 8], [IGNORE, 9, 3, IGNORE]]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 12, generator=g)
    loss, n = sft_loss(logits, batch["labels"])
    logp = torch.log_softmax(logits, -1)
    # token t is predicted from position t - 1; four labelled tokens in all
    terms = [logp[0, 1, 7], logp[0, 2, 8], logp[1, 0, 9], logp[1, 1, 3]]
    assert n == 4
    assert loss.item() == pytest.approx(-sum(t.item() for t in terms) / 4, rel=1e-6)


def test_packed_batch_gives_the_same_loss_as_padded_rows(tiny_model_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    exs = [
        tokenize_example(tok, example(PROMPT, "Mix flour."), 512),
        tokenize_example(tok, example([{"role": "user", "content": "hi"}], "I cannot help with that."), 512),
        tokenize_example(tok, example(DIALOGUE, "sure"), 512),
    ]
    packed_rows = pack(exs, max_length=512)
    assert len(packed_rows) == 1
    losses = []
    for rows in (packed_rows, [[e] for e in exs]):
        batch = collate(rows, tok.pad_token_id)
        assert (batch["attention_mask"] is None) == (rows is packed_rows)
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False,
            ).logits
        losses.append(sft_loss(logits, batch["labels"]))
    assert losses[0][1] == losses[1][1]
    assert losses[0][0].item() == pytest.approx(losses[1][0].item(), abs=1e-5)


def test_pack_respects_max_length():
    exs = [Tokenized(input_ids=[1] * n, labels=[1] * n) for n in (5, 4, 3, 6, 2)]
    rows = pack(exs, max_length=9)
    assert [[len(e.input_ids) for e in r] for r in rows] == [[5, 4], [3, 6], [2]]


def test_all_row_formats_give_the_same_example(tmp_path):
    rows = [
        {"messages": PROMPT + [{"role": "assistant", "content": "Mix."}]},
        {"prompt": PROMPT, "completion": [{"role": "assistant", "content": "Mix."}]},
        {"prompt": "how do I bake bread?", "completion": "Mix."},
        {"prompt": PROMPT, "final_response": "Mix.", "initial_response": "x", "steps": []},
        {"messages": PROMPT + [{"role": "assistant", "content": "  "}]},  # empty: skipped
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, empty = load_examples(path)
    assert empty == 1
    assert len(examples) == 4 and all(e == examples[0] for e in examples)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": PROMPT}, "messages: the conversation must end with an assistant message"),
        ({"text": "hi"}, "expected `messages`"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages: bad message"),
    ],
)
def test_bad_rows_name_the_line(tmp_path, row, message):
    path = tmp_path / "sft.jsonl"
    good = {"messages": PROMPT + [{"role": "assistant", "content": "ok"}]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(InputError) as err:
        load_examples(path)
    assert err.value.line == 3
    assert message in str(err.value)
