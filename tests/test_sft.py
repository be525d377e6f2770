"""SFT: which tokens carry loss, the loss value, packing, input formats, and the trainer (loss goes
down on a tiny model, exact resume, config errors)."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cai.cli import main
from cai.conversation import Message, to_hh
from cai.errors import CaiError, InputError
from cai.train.sft import (
    IGNORE,
    SFTConfig,
    SFTExample,
    Tokenized,
    collate,
    lm_loss,
    load_examples,
    pack,
    run_sft,
    sft_loss,
    tokenize_example,
)

PROMPT = [{"role": "user", "content": "how do I bake bread?"}]
DIALOGUE = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "the quick brown fox"},  # an earlier turn: context, no loss
    {"role": "user", "content": "how do I bake bread?"},
]


pytestmark = pytest.mark.usefixtures("one_thread")


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
    examples, skipped = load_examples(path)
    assert skipped == {"empty": 1}
    assert len(examples) == 4 and all(e == examples[0] for e in examples)


def test_drop_flags_leave_flagged_rows_out_and_repeated_ids_count_once(tmp_path):
    """SFT reads `cai generate` output: rows flagged by a listed rule and repeats of an id are not trained on."""
    def row(i: int, copied: bool) -> dict:
        return {"id": f"r{i}", "prompt": PROMPT, "final_response": f"answer {i}", "initial_response": "x",
                "steps": [], "flags": {"copied_few_shot": copied, "truncated": False}}

    path = tmp_path / "sft.jsonl"
    rows = [row(0, False), row(1, True), row(2, False), row(0, False)]  # r0 written twice
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, skipped = load_examples(path, ("copied_few_shot",))
    assert [e.response for e in examples] == ["answer 0", "answer 2"]
    assert skipped == {"flag:copied_few_shot": 1}
    examples, skipped = load_examples(path)
    assert [e.response for e in examples] == ["answer 0", "answer 1", "answer 2"] and not skipped
    with pytest.raises(ValidationError, match="unknown flag 'copied'"):
        SFTConfig(model="m", out_dir="o", train_file=str(path), drop_flags=["copied"])


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


# ---------------------------------------------------------------- the trainer


def test_lm_loss_runs_the_head_only_where_labels_are_and_matches_the_full_loss(tiny_model_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    exs = [tokenize_example(tok, example(DIALOGUE, "sure"), 512), tokenize_example(tok, example(PROMPT), 512)]
    for rows in ([[e] for e in exs], pack(exs, 512)):
        batch = collate(rows, tok.pad_token_id)
        with torch.no_grad():
            full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"], use_cache=False).logits
            expected, n = sft_loss(full, batch["labels"])
            got, m = lm_loss(model, batch)
        assert m == n == sum(sum(x != IGNORE for x in e.labels) for e in exs)
        assert got.item() == pytest.approx(expected.item(), abs=1e-5)
    # by hand on the dialogue alone: only the final response's tokens (and EOS) count, none of the
    # prompt's, including the earlier assistant turn
    one = exs[0]
    start = one.labels.index(next(x for x in one.labels if x != IGNORE))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([one.input_ids])).logits[0], -1)
        got, m = lm_loss(model, collate([[one]], tok.pad_token_id))
    hand = [-logp[t - 1, one.input_ids[t]].item() for t in range(start, len(one.input_ids))]
    assert m == len(hand) == len(tok(" sure", add_special_tokens=False)["input_ids"]) + 1
    assert got.item() == pytest.approx(sum(hand) / len(hand), rel=1e-5)


def _sft_file(path, n=40):
    rows = []
    for i in range(n):
        q = ["how do I bake bread?", "which is less harmful?", "can you help me?", "what is the answer?"][i % 4]
        rows.append({"prompt": [{"role": "user", "content": q}], "final_response": "I cannot help with that, but here "
                     "is a safer option.", "initial_response": "the lazy dog", "steps": []})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft_config(model, data, out, **kw):
    base = {"model": str(model), "out_dir": str(out), "train_file": str(data), "test_size": 0.2, "device": "cpu",
            "lr": 3e-3, "max_steps": 20, "batch_size": 4, "eval_every": 10, "save_every": 10, "log_every": 5, "seed": 1}
    base.update(kw)
    return SFTConfig(**base)


@pytest.mark.parametrize("packing", [False, True])
def test_sft_on_a_tiny_model_lowers_the_held_out_loss(tiny_model_dir, tmp_path, packing):
    data = _sft_file(tmp_path / "sft.jsonl")
    out = tmp_path / "run"
    summary = run_sft(_sft_config(tiny_model_dir, data, out, packing=packing))
    assert summary.train_examples == 32 and summary.test_examples == 8
    assert summary.train_rows == (32 if not packing else summary.train_rows) and summary.train_rows <= 32
    assert summary.test_loss_after < summary.test_loss_before - 1.0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert (evals[0]["loss"], evals[-1]["loss"]) == (summary.test_loss_before, summary.test_loss_after)
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20] and train[-1]["loss"] < train[0]["loss"]
    assert json.loads((out / "summary.json").read_text())["test_loss_after"] == pytest.approx(summary.test_loss_after)
    assert (out / "curves.png").stat().st_size > 1000
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_sft_resume_gives_identical_weights(tiny_model_dir, tmp_path):
    data = _sft_file(tmp_path / "sft.jsonl", 24)
    kw = {"max_steps": 6, "save_every": 2, "eval_every": 0, "grad_accum": 2, "log_every": 1, "plot": False}
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_sft(_sft_config(tiny_model_dir, data, whole, **kw))
    with pytest.raises(CaiError, match="stopped after step 3"):
        run_sft(_sft_config(tiny_model_dir, data, part, **kw), stop_after=3)
    resumed = run_sft(_sft_config(tiny_model_dir, data, part, **kw), resume=True)
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (whole, part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.test_loss_before is not None  # kept in the checkpoint from the first attempt


def test_sft_bad_config_is_one_paragraph_with_file_and_line(tmp_path, capsys):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("out_dir: /tmp/x\ntrain_file: t.jsonl\nmax_length: 2\n")
    assert main(["train", "sft", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cfg}:3: max_length: ") and "Traceback" not in err and err.count("\n") == 1
    cfg.write_text("out_dir: /tmp/x\ntrain_file: t.jsonl\npacking: true\npackin: true\n")
    assert main(["train", "sft", str(cfg)]) == 1
    assert f"{cfg}:4: packin: unknown key" in capsys.readouterr().err
    cfg.write_text(f"out_dir: {tmp_path / 'o'}\ntrain_file: {tmp_path / 'missing.jsonl'}\nmodel: {tmp_path}\n")
    assert main(["train", "sft", str(cfg)]) == 1
    assert "missing.jsonl: file not found" in capsys.readouterr().err
