"""vLLM engine (GPU): the same contract as the hf engine, on vLLM's offline `LLM` API.

Every request gets its own SamplingParams with its own seed, so a row's text depends on (prompt,
sampling, seed) as with the hf engine. Prompts go in as token ids, tokenized by the same rule as the
hf engine (BOS added unless the chat template wrote it), so both engines see identical inputs.
Choice scoring asks for `prompt_logprobs` on prompt + choice; prefix caching makes the shared
prompt cheap to rerun.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai.conversation import HH_STOP
from cai.engines.base import FinishReason, Generation, SamplingConfig
from cai.engines.hf import encode_prompt, has_chat_template, render_chat, turn_end_ids
from cai.errors import CaiError

if TYPE_CHECKING:
    import torch

INSTALL_HINT = (
    "the vllm engine needs the vllm package and an NVIDIA GPU: `pip install 'cai[vllm]'` on a GPU "
    "machine, or use --engine hf (CPU or GPU)."
)


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise CaiError(f"{INSTALL_HINT} (import failed: {e})") from e
    return vllm


def _logprob(entry: Any) -> float:
    """vLLM stores a Logprob object (with .logprob) per token; accept plain floats too."""
    return float(getattr(entry, "logprob", entry))


class VLLMEngine:
    """vllm.LLM behind the Engine protocol (see cai.engines.base)."""

    name = "vllm"

    def __init__(
        self,
        model: str | Path,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        enable_prefix_caching: bool = True,
        max_model_len: int | None = None,
        max_length: int | None = None,
        model_id: str | None = None,
        **llm_options: Any,
    ):
        """`llm_options` go to vllm.LLM unchanged (e.g. data_parallel_size, enforce_eager).
        `max_length` caps prompt tokens as in the hf engine."""
        vllm = _import_vllm()
        self._vllm = vllm
        self.model_id = model_id or str(model)
        self.max_length = max_length
        self.llm = vllm.LLM(
            model=str(model),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            enable_prefix_caching=enable_prefix_caching,
            max_model_len=max_model_len,
            **llm_options,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.chat = has_chat_template(self.tokenizer)
        # EOS always stops vLLM; end-of-turn tokens of chat templates must be named
        self.stop_token_ids = sorted(turn_end_ids(self.tokenizer) - {self.tokenizer.eos_token_id})

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return () if self.chat else HH_STOP

    def render_chat(self, messages: list[dict[str, str]], assistant_prefix: str = "") -> str:
        return render_chat(self.tokenizer, messages, assistant_prefix)

    def _tokens(self, ids: list[int]) -> dict[str, list[int]]:
        return {"prompt_token_ids": ids}  # vllm.inputs.TokensPrompt

    def generate(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None = None
    ) -> list[Generation]:
        ids = [encode_prompt(self.tokenizer, p, self.max_length) for p in prompts]
        return [
            Generation(text=done.text, prompt_tokens=len(prompt_ids), completion_tokens=len(done.token_ids),
                       finish_reason=self._finish(done))
            for prompt_ids, done in zip(ids, self._complete(ids, sampling, seeds))
        ]

    def generate_ids(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, seeds: list[int] | None = None
    ) -> list[tuple[list[int], FinishReason]]:
        """Sampled token ids and finish reason per prompt, for trainers that need the exact ids (PPO)."""
        return [(list(done.token_ids), self._finish(done)) for done in self._complete(prompt_ids, sampling, seeds)]

    def _complete(self, ids: list[list[int]], sampling: SamplingConfig, seeds: list[int] | None) -> list[Any]:
        """vLLM's first CompletionOutput for each prompt, one seeded SamplingParams per request."""
        if seeds is None:
            seeds = [sampling.seed + i for i in range(len(ids))]
        if len(seeds) != len(ids):
            raise ValueError(f"{len(seeds)} seeds for {len(ids)} prompts")
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

    @staticmethod
    def _finish(done: Any) -> FinishReason:
        """vLLM says "stop" for EOS, stop tokens and stop strings; stop_reason tells them apart
        (the matched string, a token id, or None for EOS)."""
        if done.finish_reason == "length":
            return "length"
        return "stop" if isinstance(done.stop_reason, str) else "eos"

    def choice_logprobs(self, prompts: list[str], choices: list[list[str]]) -> list[list[float]]:
        if len(prompts) != len(choices):
            raise ValueError(f"{len(choices)} choice lists for {len(prompts)} prompts")
        requests: list[tuple[int, int, int, list[int]]] = []  # (prompt, choice, choice start, ids)
        out: list[list[float]] = [[0.0] * len(cs) for cs in choices]
        for i, (prompt, cs) in enumerate(zip(prompts, choices)):
            p = encode_prompt(self.tokenizer, prompt, self.max_length)
            for j, c in enumerate(cs):
                c_ids = self.tokenizer(c, add_special_tokens=False)["input_ids"]
                if c_ids:
                    requests.append((i, j, len(p), p + c_ids))
        if not requests:
            return out
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        results = self.llm.generate([self._tokens(r[3]) for r in requests], params, use_tqdm=False)
        for (i, j, start, ids), res in zip(requests, results):
            # prompt_logprobs[k]: {token id: Logprob} for position k (k = 0 is None); the actual
            # token is always among the keys
            out[i][j] = sum(_logprob(res.prompt_logprobs[k][ids[k]]) for k in range(start, len(ids)))
        return out
