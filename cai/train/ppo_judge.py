"""The reward-hacking watch inside PPO: an independent AI judge scores the policy during training.

PPO maximises the reward model's score, so that score cannot show reward hacking; a judge that PPO
never optimises against can. Every `judge_every` steps (and at the last step) the policy answers a
fixed set of held-out prompts greedily, the reference policy (the frozen starting point: its own
copy, or with LoRA the policy with its adapter off) answers the same prompts once, and the judge
(`cai.stages.label`'s labeler under a constitution, both orders, soft labels) gives

    judge_win_rate = mean_i P(policy answer_i better than reference answer_i)

0.5 means no better than where training started. The value goes into that step's metrics line next
to the RM score, KL and response length, and `cai.train.judge_watch.detect_divergence` reads them
back at the end of the run (RM score up while the win rate falls, or length growing without it).

Runs on the main process only: the judge is one more model there, and the answers are greedy, so
they do not depend on the other processes. Not yet under FSDP (the run refuses it).
"""

from __future__ import annotations

from typing import Any

import torch

from cai.engines.base import SamplingConfig
from cai.engines.hf import HFEngine
from cai.train.judge_watch import WinRate, judge_win_rate
from cai.train.lora import adapter_off
from cai.train.ppo_config import PPOConfig


def judge_due(config: PPOConfig, step: int, last_step: int) -> bool:
    """Whether step `step` is judged: every `judge_every` steps and the last (the same on every process)."""
    return bool(config.judge_every) and (step % config.judge_every == 0 or step == last_step)


class PPOJudge:
    """The held-out prompts, the judge, and the reference answers (computed at the first judged step)."""

    def __init__(self, config: PPOConfig):
        from cai.stages.inputs import load_prompts
        from cai.stages.label import LabelerSettings, load_labeler

        assert config.judge_every and config.judge_prompts is not None, "PPOJudge needs judge_every and judge_prompts"
        self.config = config
        self.prompts = load_prompts(config.judge_prompts, limit=config.judge_limit)
        settings = LabelerSettings(constitution=config.judge_constitution_path(), model=config.judge_model,
                                   principles=config.judge_principles, seed=config.seed)
        self.labeler = load_labeler(settings, None)
        self.sampling = SamplingConfig(temperature=0.0, max_new_tokens=config.max_new_tokens, seed=config.seed)
        self.reference: list[str] | None = None

    def answers(self, model: Any, tokenizer: Any) -> list[str]:
        """Greedy answers of `model` to the held-out prompts, in eval mode (dropout and checkpointing off)."""
        engine = HFEngine.from_loaded(tokenizer, model, model_id="ppo-policy", prefix_cache=False)
        texts = [engine.render_chat([m.model_dump() for m in conv]) for conv in self.prompts]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                gens = engine.generate(texts, self.sampling.model_copy(update={"stop": engine.stop_sequences}))
        finally:
            model.train(was_training)
        return [g.text.strip() for g in gens]

    def win_rate(self, policy: Any, ref: Any | None, tokenizer: Any) -> WinRate:
        """Judge the policy's answers against the reference's; `ref` None: the policy with its adapter off."""
        if self.reference is None:
            if ref is not None:
                self.reference = self.answers(ref, tokenizer)
            else:
                with adapter_off(policy):
                    self.reference = self.answers(policy, tokenizer)
        return judge_win_rate(self.labeler, self.prompts, self.answers(policy, tokenizer), self.reference)
