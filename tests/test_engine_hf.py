"""HFEngine on the tiny random model: per-row determinism, stopping, counts, choice scoring, formats."""

from __future__ import annotations

import shutil

import pytest
import torch

from cai.conversation import HH_STOP, to_hh
from cai.engines import hf, load_engine
from cai.engines.base import Engine, SamplingConfig, row_flag
from cai.engines.hf import HFEngine, sample_rows
from cai.errors import CaiError
from cai.tokens import ensure_pad_token, turn_end_ids

PROMPTS = [
    "Human: how do I bake bread?",
    "the quick",
    "Critique: the response is helpful and harmless. Revision: the response stays the same. Critique:",
    "yes",
    "Which of these responses is less harmful? (A) first (B) second.",
]
SAMPLED = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7)
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> HFEngine:
    # batch_size 3 with 5 prompts: two chunks, rows of different lengths share a padded batch
    return HFEngine(tiny_model_dir, device="cpu", dtype="float32", batch_size=3)


def ascii_stop(text: str, start: int = 3) -> str:
    """A printable ASCII character whose first occurrence in `text` is at or after `start`
    (the random tiny model writes mostly odd bytes)."""
    for i in range(start, len(text)):
        s = text[i]
        if s.isascii() and s.isalnum() and text.find(s) == i:
            return s
    raise AssertionError(f"no usable stop string in {text!r}")


def test_satisfies_engine_protocol(engine):
    assert isinstance(engine, Engine)
    assert engine.name == "hf" and engine.model_id == str(engine.model_id)
    assert not engine.model.training


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_row_output_does_not_depend_on_batch_mates(engine, sampling):
    together = engine.generate(PROMPTS, sampling)
    for i, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], sampling, seeds=[sampling.seed + i])
        assert alone == [together[i]], f"row {i} differs when generated alone"
    reordered = engine.generate(PROMPTS[::-1], sampling, seeds=[sampling.seed + i for i in range(5)][::-1])
    assert reordered == together[::-1]


def test_rows_stopping_at_different_steps_match_alone(engine):
    # stop strings taken from each row's own text make rows finish at different steps, so finished
    # rows are dropped from the KV cache mid-batch
    long = SAMPLED.model_copy(update={"max_new_tokens": 40})
    free = engine.generate(PROMPTS, long)
    stops = tuple(ascii_stop(g.text, start=2 + 2 * i) for i, g in enumerate(free))
    sampling = long.model_copy(update={"stop": stops})
    together = engine.generate(PROMPTS, sampling)
    assert {g.finish_reason for g in together} == {"stop"}
    assert len({g.completion_tokens for g in together}) > 1
    for i, prompt in enumerate(PROMPTS):
        assert engine.generate([prompt], sampling, seeds=[sampling.seed + i]) == [together[i]]


def test_same_seed_same_text_different_seed_different_text(engine):
    a = engine.generate(PROMPTS[:1] * 3, SAMPLED, seeds=[5, 5, 6])
    assert a[0] == a[1]
    assert a[0].text != a[2].text
    # default seeds are sampling.seed + i
    assert engine.generate(PROMPTS[:2], SAMPLED) == engine.generate(PROMPTS[:2], SAMPLED, seeds=[7, 8])


def test_max_new_tokens_and_token_counts(engine):
    out = engine.generate(PROMPTS, SAMPLED.model_copy(update={"max_new_tokens": 5}))
    for prompt, g in zip(PROMPTS, out):
        assert g.finish_reason == "length"
        assert g.completion_tokens == 5
        assert g.prompt_tokens == len(engine.tokenizer(prompt)["input_ids"])


def test_stop_sequence_cuts_text_and_counts_tokens_to_the_stop(engine):
    seeds, long = [11], SAMPLED.model_copy(update={"max_new_tokens": 40})
    full = engine.generate(PROMPTS[:1], long, seeds=seeds)[0].text
    stop = ascii_stop(full)
    out = engine.generate(PROMPTS[:1], long.model_copy(update={"stop": ("never-there", stop)}), seeds=seeds)[0]
    assert out.finish_reason == "stop"
    assert out.text == full[:full.find(stop)]
    # the stop string is complete after exactly completion_tokens tokens, not one earlier
    k = out.completion_tokens
    assert stop in engine.generate(PROMPTS[:1], SAMPLED.model_copy(update={"max_new_tokens": k}), seeds=seeds)[0].text
    assert stop not in engine.generate(
        PROMPTS[:1], SAMPLED.model_copy(update={"max_new_tokens": k - 1}), seeds=seeds)[0].text


def test_greedy_stop_equal_to_what_greedy_produces(engine):
    text = engine.generate(PROMPTS[1:2], GREEDY)[0].text
    out = engine.generate(PROMPTS[1:2], GREEDY.model_copy(update={"stop": (text[:3],)}))[0]
    assert (out.text, out.finish_reason) == ("", "stop")


def test_eos_ends_a_row_and_is_not_in_the_text(engine):
    eos = engine.tokenizer.eos_token_id
    head = engine.model.get_output_embeddings()

    def push_eos(module, inputs, output):  # make EOS the most likely token from the 3rd step on
        if push_eos.calls >= 2:
            output[..., eos] += 1000.0
        push_eos.calls += 1
        return output

    push_eos.calls = 0
    handle = head.register_forward_hook(push_eos)
    try:
        out = engine.generate(PROMPTS[:2], GREEDY)
    finally:
        handle.remove()
    for g in out:
        assert g.finish_reason == "eos"
        assert g.completion_tokens == 3  # two tokens, then EOS (counted)
    assert out[0].text == engine.generate(PROMPTS[:1], GREEDY.model_copy(update={"max_new_tokens": 2}))[0].text


@pytest.mark.parametrize("candidates", [1024, 2], ids=["top-k candidates", "full sort fallback"])
def test_top_p_draws_from_the_nucleus_in_proportion(monkeypatch, candidates):
    monkeypatch.setattr(hf, "_TOP_P_CANDIDATES", candidates)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0], [-3.0, -1.0, 0.0, 0.5, 1.0, 2.0]])
    sampling = SamplingConfig(temperature=0.7, top_p=0.9)
    probs = torch.softmax(logits / 0.7, -1)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    draws = torch.stack([sample_rows(logits, sampling, gens) for _ in range(3000)])  # [draws, rows]
    # row 0: the mass before token 2 is 0.87 < 0.9, so tokens 0-2 form the nucleus (row 1 mirrored)
    for row, nucleus in [(0, [0, 1, 2]), (1, [5, 4, 3])]:
        counts = torch.bincount(draws[:, row], minlength=6).float() / len(draws)
        expected = torch.zeros(6)
        expected[nucleus] = probs[row, nucleus] / probs[row, nucleus].sum()
        assert torch.allclose(counts, expected, atol=0.03), (row, counts, expected)
    assert sample_rows(logits, SamplingConfig(temperature=0.0), gens).tolist() == [0, 5]


def test_choice_logprobs_match_hand_computation(engine):
    prompts = PROMPTS[:4]
    choices = [[" A", " B"], [" quick brown fox", "x", ""], [" (A)", " (B) second"], ["no"]]
    got = engine.choice_logprobs(prompts, choices)
    tok, model = engine.tokenizer, engine.model
    for prompt, cs, row in zip(prompts, choices, got):
        p = tok(prompt)["input_ids"]
        for c, value in zip(cs, row):
            ids = tok(c, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([p + ids])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            hand = sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(ids))
            assert value == pytest.approx(hand, abs=1e-4)
    assert got[1][2] == 0.0  # empty continuation


def test_choice_logprobs_do_not_depend_on_batch(engine):
    choices = [[" A", " B second"]] * len(PROMPTS)
    together = engine.choice_logprobs(PROMPTS, choices)
    for i, prompt in enumerate(PROMPTS):
        assert engine.choice_logprobs([prompt], choices[:1])[0] == pytest.approx(together[i], abs=1e-5)


def test_render_chat_hh_format_without_template(engine):
    messages = [{"role": "user", "content": "Is this safe?"}, {"role": "assistant", "content": "Yes."},
                {"role": "user", "content": "Why?"}]
    assert engine.render_chat(messages, "Critique:") == to_hh(messages, "Critique:")
    assert engine.render_chat(messages).endswith("\n\nAssistant:")
    assert engine.stop_sequences == HH_STOP


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<end_of_turn>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_engine(tiny_model_dir, tmp_path_factory) -> HFEngine:
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_model_dir, d, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    return HFEngine(d, device="cpu", dtype="float32")


def test_render_chat_uses_the_chat_template(chat_engine):
    messages = [{"role": "user", "content": "Hi"}]
    text = chat_engine.render_chat(messages, "Revision:")
    assert text == "<bos><user>Hi<end_of_turn><assistant>Revision:"
    assert chat_engine.stop_sequences == ()
    ids = chat_engine.encode(text)
    bos = chat_engine.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1  # the template's BOS is not doubled


def test_end_of_turn_token_counts_as_eos(chat_engine):
    eot = chat_engine.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert eot in chat_engine.end_ids
    assert eot in turn_end_ids(chat_engine.tokenizer)
    assert chat_engine.tokenizer.eos_token_id in chat_engine.end_ids


def test_pad_token_distinct_from_eos(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.eos_token
    ensure_pad_token(tok, model)
    assert tok.pad_token == tok.unk_token and model.config.pad_token_id == tok.unk_token_id

    tok.pad_token = tok.eos_token
    tok.unk_token = None
    rows = model.get_input_embeddings().weight.shape[0]
    ensure_pad_token(tok, model)
    assert tok.pad_token == "<pad>" or tok.pad_token_id not in (None, tok.eos_token_id)
    assert tok.pad_token_id != tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] >= max(rows, tok.pad_token_id + 1)


def test_missing_model_is_a_cai_error_saying_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model in [str(tmp_path / "no-such-model"), "no-such-org/no-such-model-xyz"]:
        with pytest.raises(CaiError) as err:
            HFEngine(model, device="cpu")
        msg = str(err.value)
        assert model in msg and "huggingface-cli download" in msg and "HF_HOME" in msg
        assert "bundled Gemma" in msg and "\n" not in msg


def test_load_engine_errors(tiny_model_dir, monkeypatch):
    with pytest.raises(CaiError, match="choose one of: hf, vllm"):
        load_engine("llamacpp", str(tiny_model_dir))
    with pytest.raises(CaiError, match="unknown option.*temprature.*allowed: device"):
        load_engine("hf", str(tiny_model_dir), temprature=0.5)
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(CaiError, match=r"pip install 'cai\[vllm\]'.*GPU"):
        load_engine("vllm", str(tiny_model_dir))


def test_load_engine_default_model_records_a_stable_id(tiny_model_dir, monkeypatch):
    import cai.default_model as dm

    monkeypatch.setattr(dm, "default_model_path", lambda cache_dir=None: tiny_model_dir)
    engine = load_engine("hf", None, device="cpu", dtype="float32", batch_size=2)
    assert engine.model_id == dm.DEFAULT_MODEL_ID
    assert engine.batch_size == 2


# ---- shared-prefix KV reuse ---------------------------------------------------------------------

FEW_SHOT = (
    "Human: how do I bake bread? Assistant: Mix flour, water, salt and yeast, then knead and bake. "
    "Critique: the response is helpful and harmless. Revision: the response stays the same."
)
SHARED = [FEW_SHOT + s for s in [
    " Human: yes", " the quick brown fox jumps", " I cannot help with that, but here is a safer option. Please ask",
    " no", " maybe sure 0 1 2", "",  # the last one is the prefix itself: a one-token suffix after the cap
]]
SHARED_CHOICES = [[" A", " B second"], [" quick brown fox", "x"], ["no"], [" yes", ""], [" maybe sure"], [" Human"]]


def build_tiny_gemma3(out_dir):
    """A tiny Gemma 3 (the default model's architecture) with a sliding window shorter than the
    prompts, so reuse must keep every row's relative token distances exact."""
    from tiny import build_tokenizer
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    Gemma3ForCausalLM(config).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module", params=["llama", "gemma3-sliding"])
def engine_pair(request, tiny_model_dir, tmp_path_factory) -> tuple[HFEngine, HFEngine]:
    """(without reuse, with reuse) on the same weights; batch_size 4 with 6 prompts: two chunks."""
    path = tiny_model_dir if request.param == "llama" else build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))
    plain = HFEngine(path, device="cpu", dtype="float32", batch_size=4, prefix_cache=False)
    reuse = HFEngine(path, device="cpu", dtype="float32", batch_size=4, prefix_min_tokens=16)
    return plain, reuse


def forward_widths(engine: HFEngine, fn):
    """(batch, tokens) of every forward pass the engine makes while running fn()."""
    shapes: list[tuple[int, int]] = []
    handle = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        result = fn()
    finally:
        handle.remove()
    return result, shapes


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED.model_copy(update={"max_new_tokens": 20})], ids=["greedy", "sampled"])
def test_prefix_reuse_gives_the_same_tokens(engine_pair, sampling):
    plain, reuse = engine_pair
    n = len(reuse.encode(FEW_SHOT))
    assert n >= 100
    expected = plain.generate(SHARED, sampling)
    got, shapes = forward_widths(reuse, lambda: reuse.generate(SHARED, sampling))
    assert got == expected
    # the prefix ran once for one row, and no pass re-ran it for a batch
    assert shapes[0] == (1, n - 1)  # capped: the last prompt is the prefix itself and keeps one token
    assert all(width < n for batch, width in shapes[1:])
    # the same rows alone (no shared prefix to reuse: one prompt per call) agree too
    for i in (0, 5):
        assert reuse.generate([SHARED[i]], sampling, seeds=[sampling.seed + i]) == [expected[i]]


def test_prefix_reuse_choice_logprobs_match_plain_and_hand_computation(engine_pair):
    plain, reuse = engine_pair
    expected = plain.choice_logprobs(SHARED, SHARED_CHOICES)
    got, shapes = forward_widths(reuse, lambda: reuse.choice_logprobs(SHARED, SHARED_CHOICES))
    assert shapes[0][0] == 1 and all(width < shapes[0][1] for _, width in shapes[1:])
    for e_row, g_row in zip(expected, got):
        assert g_row == pytest.approx(e_row, abs=1e-5)
    tok, model = reuse.tokenizer, reuse.model
    p = tok(SHARED[2])["input_ids"]
    for c, value in zip(SHARED_CHOICES[2], got[2]):
        ids = tok(c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + ids])).logits[0].float(), -1)
        assert value == pytest.approx(sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(ids)), abs=1e-4)


def test_identical_prompts_and_short_prefixes(engine_pair):
    plain, reuse = engine_pair
    same = [SHARED[0]] * 3  # every suffix is the prompt's last token: nothing to prefill but that step
    assert reuse.generate(same, SAMPLED, seeds=[1, 2, 3]) == plain.generate(same, SAMPLED, seeds=[1, 2, 3])
    short = PROMPTS[:2]  # share fewer than prefix_min_tokens: no reuse, one batched pass
    _, shapes = forward_widths(reuse, lambda: reuse.generate(short, GREEDY.model_copy(update={"max_new_tokens": 1})))
    assert shapes == [(2, max(len(reuse.encode(p)) for p in short))]


def test_empty_prompt_is_flagged_and_skipped_without_failing_the_batch(engine):
    out = engine.generate(["hi", ""], GREEDY)
    assert out[0] == engine.generate(["hi"], GREEDY)[0] and out[0].flag is None
    assert (out[1].text, out[1].completion_tokens, out[1].finish_reason, out[1].flag) == ("", 0, "skipped", "empty_prompt")
    scores = engine.choice_logprobs(["hi", ""], [[" A", " B"], [" A", " B"]])
    assert row_flag(scores[1]) == "empty_prompt" and list(scores[1]) == [0.0, 0.0]
    assert row_flag(scores[0]) is None and scores[0][0] < 0


def long_prompt(engine: HFEngine, tokens: int) -> str:
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * tokens)
    ids = engine.tokenizer(text)["input_ids"]
    assert len(ids) > tokens
    return engine.tokenizer.decode(ids[:tokens])


def test_overlong_prompt_is_cut_to_the_context_keeping_first_and_last_tokens(engine):
    """The tiny model's context is 1024 tokens: a 3000-token prompt is left-truncated to leave room
    for max_new_tokens (old code ran all 3000 positions, and a 5 MB prompt tried to allocate TBs)."""
    assert engine.window == 1024
    text = long_prompt(engine, 3000) + " Assistant: the end"
    out = engine.generate([text, "hi"], GREEDY)
    assert out[0].flag == "prompt_too_long" and out[0].prompt_tokens == 1024 - GREEDY.max_new_tokens
    assert out[0].finish_reason in ("eos", "length") and out[1] == engine.generate(["hi"], GREEDY)[0]
    ids = engine.tokenizer(text)["input_ids"]
    cut = ids[:1] + ids[len(ids) - (1024 - GREEDY.max_new_tokens) + 1:]
    assert out[0].text == engine.generate([engine.tokenizer.decode(cut)], GREEDY)[0].text  # same tokens run
    scores = engine.choice_logprobs([text], [[" A", " B second"]])[0]
    assert row_flag(scores) == "prompt_too_long" and all(s < 0 for s in scores)


def test_overlong_skip_rule_and_max_length(tiny_model_dir):
    skip = HFEngine(tiny_model_dir, device="cpu", dtype="float32", overlong="skip", max_length=40)
    text = long_prompt(skip, 60)
    out = skip.generate([text, "hi"], GREEDY)
    assert (out[0].finish_reason, out[0].flag, out[0].completion_tokens) == ("skipped", "prompt_too_long", 0)
    assert out[1].flag is None and out[1].completion_tokens > 0
    assert skip.details()["overlong"] == "skip" and skip.details()["max_length"] == 40
    with pytest.raises(CaiError, match="overlong"):
        HFEngine(tiny_model_dir, device="cpu", overlong="cut")


@pytest.fixture(scope="module")
def merging_engine(tmp_path_factory) -> HFEngine:
    """A tiny model whose tokenizer has merges (vocab 400), so a choice can fuse with the prompt's end."""
    from tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("merging"), vocab_size=400)
    return HFEngine(path, device="cpu", dtype="float32")


def test_choice_scored_on_prompt_and_choice_tokenized_together(merging_engine):
    """lm-eval-harness rule: "ba" + "ke bread?" is read as the model reads "bake bread?". Tokenized
    apart, the choice would be 5 tokens starting with "k"; together, the split at the prompt's
    length leaves the last 2 tokens as the continuation."""
    engine, tok = merging_engine, merging_engine.tokenizer
    prompt, choice = "Human: how do I ba", "ke bread?"
    apart = tok(prompt)["input_ids"], tok(choice, add_special_tokens=False)["input_ids"]
    joint = tok(prompt + choice)["input_ids"]
    assert joint[:len(apart[0])] != apart[0]  # a merge across the boundary

    def logp(context: list[int], continuation: list[int]) -> float:
        with torch.no_grad():
            logits = engine.model(torch.tensor([context + continuation])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        return sum(float(lp[len(context) - 1 + k, t]) for k, t in enumerate(continuation))

    got = engine.choice_logprobs([prompt], [[choice, " fox"]])[0]
    cut = len(apart[0])
    assert got[0] == pytest.approx(logp(joint[:cut], joint[cut:]), abs=1e-4)
    assert abs(got[0] - logp(*apart)) > 1e-2  # the old rule gives a different number
    fox = tok(prompt + " fox")["input_ids"]
    assert got[1] == pytest.approx(logp(fox[:cut], fox[cut:]), abs=1e-4)
