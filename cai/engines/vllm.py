"""vLLM engine (GPU): the same contract as the hf engine, on vLLM's offline `LLM` API (0.33.x).

Generation: every request gets its own SamplingParams with its own seed (n=1: with n>1 vLLM derives
child seeds from the parent). Prompts go in as token ids, tokenized by the same rule as the hf engine
(BOS added unless the chat template wrote it) and fitted to the context one by one
(cai.engines.lengths): vLLM rejects a too-long or empty prompt with an error that aborts every
request of the call, so such rows never reach it; they come back flagged.

Choice scoring (the labeler's hot path): prompt + choice are tokenized together and split at the
prompt length. When every choice of a prompt is one token after the split (the usual " A" / " B"),
the prompt is ONE request with max_tokens=1 and `logprob_token_ids` = the choices: log-probs at one
position, and the prompt reads the prefix cache (shared few-shot text is prefilled once). Otherwise
each (prompt, choice) is a request that scores only the choice positions and only the choice tokens
(`prompt_logprob_start` + `prompt_logprob_token_ids`, model runner V2) or, on the V1 runner, falls
back to `prompt_logprobs=0`. vLLM never reads the prefix cache for requests with prompt log-probs,
so multi-token choices cost a full prefill each. detokenize=False throughout scoring.

Reproducibility: vLLM's text for a row depends on the batch it was scheduled with unless batch
invariance is on (`batch_invariant=True` sets VLLM_BATCH_INVARIANT=1 before the engine starts).
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai.conversation import HH_STOP
from cai.engines.base import FinishReason, Generation, SamplingConfig, Scores
from cai.engines.identity import stable_model_id
from cai.engines.lengths import (
    OVERLONG_RULES,
    Overlong,
    encode_within,
    fit_prompt,
    plan_scoring,
    prompt_budget,
)
from cai.errors import CaiError
from cai.tokens import encode_prompt, has_chat_template, render_chat, turn_end_ids

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The vLLM releases this engine is written and tested against (pyproject's `vllm` extra says the same).
SUPPORTED_VLLM = ((0, 33), (0, 34))  # [min, max)
INSTALL_HINT = (
    "the vllm engine needs vllm 0.33.x and an NVIDIA GPU (vllm 0.33 wheels need torch 2.14 and CUDA 13, "
    "i.e. an NVIDIA driver r580 or newer): `pip install 'cai[vllm]'` on a GPU machine, or use --engine hf "
    "(CPU or GPU)."
)
# LLM options that change what the model outputs; recorded in provenance and fingerprints.
OUTPUT_OPTIONS = ("quantization", "kv_cache_dtype", "revision", "hf_overrides", "enforce_eager", "seed")
_FINISH: dict[str, FinishReason] = {"abort": "abort", "error": "error", "repetition": "repetition"}


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise CaiError(f"{INSTALL_HINT} (import failed: {e})") from e
    check_vllm_version(getattr(vllm, "__version__", "unknown"))
    return vllm


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM outside SUPPORTED_VLLM: its SamplingParams/LLM options differ from what we send."""
    (lo, hi) = SUPPORTED_VLLM
    try:
        have = tuple(int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError:
        have = ()
    if not (len(have) == 2 and lo <= have < hi):
        raise CaiError(
            f"vllm {version} is installed, but cai's vllm engine supports vllm >={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]} "
            f"(the scoring and finish-reason APIs it uses changed between releases). Run "
            f"`pip install 'vllm>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}'` (or `pip install 'cai[vllm]'`), or use --engine hf."
        )


def _start_error(model: str, share: float, cause: Exception) -> CaiError:
    text = (str(cause).splitlines()[0] if str(cause) else type(cause).__name__).rstrip(".")
    if "memory" in text.lower():
        return CaiError(
            f"vLLM could not start {model!r} with gpu_memory_utilization={share}: {text}. Another engine "
            "(in this process or another one) holds that GPU memory. Lower gpu_memory_utilization "
            "(engine option) so all engines on the GPU fit, or run one engine per GPU "
            "(CUDA_VISIBLE_DEVICES=i with --shard i/n)."
        )
    return CaiError(f"vLLM could not start {model!r}: {text}")


class VLLMEngine:
    """vllm.LLM behind the Engine protocol (see cai.engines.base)."""

    name = "vllm"

    def __init__(
        self,
        model: str | Path,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,  # = cai.engines.VLLM_DEFAULT_SHARE
        dtype: str = "auto",
        enable_prefix_caching: bool = True,
        max_model_len: int | None = None,
        max_length: int | None = None,
        model_id: str | None = None,
        batch_invariant: bool = False,
        overlong: Overlong = "truncate",
        **llm_options: Any,
    ):
        """`llm_options` go to vllm.LLM unchanged (e.g. enforce_eager, max_num_seqs, quantization).
        `max_length` caps prompt tokens below max_model_len; `overlong` is the rule for prompts that
        do not fit (cai.engines.lengths). `batch_invariant` makes a row's output independent of its
        batch-mates (VLLM_BATCH_INVARIANT=1; slower; see the README for supported GPUs)."""
        if overlong not in OVERLONG_RULES:
            raise CaiError(f"engine option overlong={overlong!r}: use one of {', '.join(OVERLONG_RULES)}")
        if int(llm_options.get("data_parallel_size", 1)) > 1:
            raise CaiError(
                "engine option data_parallel_size>1: vLLM's offline LLM runs one engine per process. "
                "Run one cai process per GPU instead (CUDA_VISIBLE_DEVICES=i ... --shard i/n, then "
                "`cai merge`), or --executor ray with one actor per GPU."
            )
        vllm = _import_vllm()
        self._vllm = vllm
        self.model_id = model_id or stable_model_id(model)
        self.max_length = max_length
        self.overlong: Overlong = overlong
        if batch_invariant:
            os.environ["VLLM_BATCH_INVARIANT"] = "1"  # read by vLLM when the engine starts
            # an engine already started in this process may have frozen vLLM's env reads
            getattr(getattr(vllm, "envs", None), "disable_envs_cache", lambda: None)()
        self.batch_invariant = os.environ.get("VLLM_BATCH_INVARIANT", "0") not in ("", "0")
        self._options = {
            "dtype": dtype, "tensor_parallel_size": tensor_parallel_size, "enable_prefix_caching": enable_prefix_caching,
            **{k: llm_options[k] for k in OUTPUT_OPTIONS if k in llm_options},
        }
        try:
            self.llm = vllm.LLM(
                model=str(model), tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
                enable_prefix_caching=enable_prefix_caching, max_model_len=max_model_len, **llm_options,
            )
        except TypeError as e:  # EngineArgs rejects an unknown keyword
            raise CaiError(f"vLLM rejected an engine option: {e}. See `vllm.EngineArgs` for the valid names.") from e
        except (ValueError, RuntimeError) as e:
            raise _start_error(str(model), gpu_memory_utilization, e) from e
        engine = self.llm.llm_engine
        self.window: int = int(engine.model_config.max_model_len)
        self.v2_runner = bool(getattr(getattr(engine, "vllm_config", None), "use_v2_model_runner", False))
        self.tokenizer = self.llm.get_tokenizer()
        self.chat = has_chat_template(self.tokenizer)
        # EOS always stops vLLM; end-of-turn tokens of chat templates must be named
        self.stop_token_ids = sorted(turn_end_ids(self.tokenizer) - {self.tokenizer.eos_token_id})

    def details(self) -> dict[str, Any]:
        return {"vllm": str(self._vllm.__version__), "batch_invariant": self.batch_invariant,
                "max_model_len": self.window, "max_length": self.max_length, "overlong": self.overlong,
                **self._options}

    def close(self) -> None:
        """Shut the engine down and give its GPU memory back, so another engine can start in this process."""
        llm = self.__dict__.pop("llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return () if self.chat else HH_STOP

    def render_chat(self, messages: list[dict[str, str]], assistant_prefix: str = "") -> str:
        return render_chat(self.tokenizer, messages, assistant_prefix)

    @staticmethod
    def _tokens(ids: list[int]) -> dict[str, list[int]]:
        return {"prompt_token_ids": ids}  # vllm.inputs.TokensPrompt

    # ---- generation ----------------------------------------------------------------------------

    def generate(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None = None
    ) -> list[Generation]:
        seeds = self._seeds(len(prompts), sampling, seeds)
        budget = prompt_budget(self.window, self.max_length, sampling.max_new_tokens)
        fitted = []
        for p in prompts:
            _, ids = encode_within(lambda t: encode_prompt(self.tokenizer, t), p, budget)
            fitted.append((ids, *fit_prompt(ids, budget, self.overlong)))
        run = [i for i, (_, ids, _) in enumerate(fitted) if ids is not None]
        done = self._complete([fitted[i][1] for i in run], sampling, [seeds[i] for i in run])  # type: ignore[misc]
        out = [Generation(text="", prompt_tokens=len(ids), completion_tokens=0, finish_reason="skipped", flag=flag)
               for ids, _, flag in fitted]
        for i, d in zip(run, done):
            out[i] = Generation(text=d.text, prompt_tokens=len(fitted[i][1]), completion_tokens=len(d.token_ids),  # type: ignore[arg-type]
                                finish_reason=self._finish(d), flag=fitted[i][2])
        return out

    def generate_ids(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, seeds: list[int] | None = None
    ) -> list[tuple[list[int], FinishReason]]:
        """Sampled token ids and finish reason per prompt, for trainers that need the exact ids (PPO)."""
        seeds = self._seeds(len(prompt_ids), sampling, seeds)
        return [(list(done.token_ids), self._finish(done)) for done in self._complete(prompt_ids, sampling, seeds)]

    @staticmethod
    def _seeds(n: int, sampling: SamplingConfig, seeds: list[int] | None) -> list[int]:
        if seeds is None:
            return [sampling.seed + i for i in range(n)]
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} prompts")
        return list(seeds)

    def _complete(self, ids: list[list[int]], sampling: SamplingConfig, seeds: list[int]) -> list[Any]:
        """vLLM's first CompletionOutput for each prompt, one seeded SamplingParams per request."""
        if not ids:
            return []
        params = [
            self._vllm.SamplingParams(
                n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens, stop=list(sampling.stop) or None,
                stop_token_ids=self.stop_token_ids or None, seed=int(seed),
            )
            for seed in seeds
        ]
        outputs = self.llm.generate([self._tokens(i) for i in ids], params, use_tqdm=False)
        return [request.outputs[0] for request in outputs]

    @staticmethod
    def _finish(done: Any) -> FinishReason:
        """vLLM says "stop" for EOS, stop tokens and stop strings; stop_reason tells them apart
        (the matched string, a token id, or None for EOS). abort/error/repetition are kept as
        they are: such a row ended early and is not a finished answer."""
        reason = str(done.finish_reason)
        if reason == "length":
            return "length"
        if reason == "stop":
            return "stop" if isinstance(done.stop_reason, str) else "eos"
        if reason not in _FINISH:
            log.warning("vLLM finish reason %r not known to cai: recorded as 'error'", reason)
        return _FINISH.get(reason, "error")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new weights (transformers parameter names) into the served model, in place.

        Runs `load_weights` on the model inside each vLLM worker through `LLM.apply_model`; the
        tensors travel by reference, so the engine must run in this process (PPO creates it with
        VLLM_ENABLE_V1_MULTIPROCESSING=0). Cached prefixes were computed with the old weights and
        are dropped.
        """
        named = list(weights)
        self.llm.apply_model(lambda model: model.load_weights(named))
        self.llm.reset_prefix_cache()

    # ---- scoring -------------------------------------------------------------------------------

    def choice_logprobs(self, prompts: list[str], choices: list[list[str]]) -> list[list[float]]:
        if len(prompts) != len(choices):
            raise ValueError(f"{len(choices)} choice lists for {len(prompts)} prompts")
        # window - 1: vLLM needs room for the one token each scoring request generates
        plan = plan_scoring(lambda t: encode_prompt(self.tokenizer, t), prompts, choices, self.window - 1,
                            self.max_length, self.overlong)
        out = [Scores([0.0] * len(cs), plan.flags[i]) for i, cs in enumerate(choices)]
        by_context: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
        for i, j, context, continuation in plan.jobs:
            by_context.setdefault(tuple(context), []).append((i, j, continuation))
        single = {c: jobs for c, jobs in by_context.items() if all(len(cont) == 1 for _, _, cont in jobs)}
        multi = [(list(c), job) for c, jobs in by_context.items() if c not in single for job in jobs]
        self._score_single_tokens(single, out)
        self._score_sequences(multi, out)
        return out

    def _score_single_tokens(self, single: dict[tuple[int, ...], list[tuple[int, int, list[int]]]],
                             out: list[Scores]) -> None:
        """One max_tokens=1 request per context, log-probs read for the choice tokens only."""
        if not single:
            return
        contexts = list(single)
        params = [
            self._vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                      logprob_token_ids=sorted({cont[0] for _, _, cont in single[c]}))
            for c in contexts
        ]
        results = self.llm.generate([self._tokens(list(c)) for c in contexts], params, use_tqdm=False)
        for c, res in zip(contexts, results):
            position = res.outputs[0].logprobs[0]  # {token id: Logprob} at the first generated position
            for i, j, cont in single[c]:
                out[i][j] = float(position[cont[0]].logprob)

    def _score_sequences(self, jobs: list[tuple[list[int], tuple[int, int, list[int]]]], out: list[Scores]) -> None:
        """One request per (context, continuation), scoring the continuation's positions only."""
        if not jobs:
            return
        params = []
        for context, (_, _, cont) in jobs:
            if self.v2_runner:
                params.append(self._vllm.SamplingParams(
                    max_tokens=1, temperature=0.0, detokenize=False, prompt_logprob_start=len(context) - 1,
                    prompt_logprob_token_ids=[[t] for t in cont]))
            else:
                params.append(self._vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                                        prompt_logprobs=0))
        results = self.llm.generate([self._tokens(c + job[2]) for c, job in jobs], params, use_tqdm=False)
        for (context, (i, j, cont)), res in zip(jobs, results):
            if self.v2_runner:
                # [len(cont), 1]: row k scores cont[k] as the prediction of prompt token len(context) + k
                out[i][j] = float(sum(float(row[0]) for row in res.prompt_token_id_logprobs))
            else:
                # prompt_logprobs[k]: {token id: Logprob} for position k (k = 0 is None); the actual
                # token is always among the keys
                ids = context + cont
                out[i][j] = sum(float(res.prompt_logprobs[k][ids[k]].logprob) for k in range(len(context), len(ids)))
