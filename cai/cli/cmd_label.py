"""`cai label`: AI-feedback preference labels; `cai label eval`: agreement with human labels."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cai.cli.config_args import EXECUTOR_FLAGS

GROUP = None

# CLI flag -> (config field, type, help); shared by both commands
_LABELER_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--constitution": ("constitution", str, "constitution YAML (its feedback questions are asked)"),
    "--model": ("model", str, "labeler: local model dir or hub id (default: bundled Gemma 3 270M)"),
    "--engine": ("engine", str, "hf (default) or vllm"),
    "--feedback-templates": ("feedback_templates", str, "feedback prompt YAML (default prompts/feedback.yaml)"),
    "--principles": ("principles", int, "principles per pair, drawn with the seed (default: all)"),
    "--cot-max-new-tokens": ("cot_max_new_tokens", int, "reasoning length in --cot mode (default 128)"),
    "--cot-temperature": ("cot_temperature", float, "reasoning temperature in --cot mode (default 0 = greedy)"),
    "--seed": ("seed", int, "run seed (default 0)"),
    "--limit": ("limit", int, "only the first N inputs"),
    "--batch-size": ("batch_size", int, "pairs per engine call (default 8)"),
}
_LABEL_FLAGS = {
    "--pairs": ("pairs", str, "JSONL of prompt/response_a/response_b (or prompt/chosen/rejected, HH transcripts)"),
    "--critique": ("critique", str, "`cai generate` output: label initial vs revised response"),
    "--prompts": ("prompts", str, "prompts to sample a policy on; pairs of its samples are labelled"),
    "--out": ("out", str, "output JSONL (append-only; rerun to resume)"),
    "--shard": ("shard", str, "i/n: this machine's share of the inputs"),
    "--samples": ("samples", int, "policy samples per prompt with --prompts (default 2; every two form a pair)"),
    "--policy-model": ("policy_model", str, "model that samples with --prompts (default: the labeler)"),
    "--policy-temperature": ("policy_temperature", float, "policy sampling temperature (default 1.0)"),
    "--policy-top-p": ("policy_top_p", float, "policy nucleus sampling (default 1.0)"),
    "--policy-max-new-tokens": ("policy_max_new_tokens", int, "policy response length (default 128)"),
    **_LABELER_FLAGS,
    **EXECUTOR_FLAGS,
}
_EVAL_FLAGS = {
    "--pairs": ("pairs", str, "human pairs: HH-RLHF chosen/rejected transcripts or prompt/chosen/rejected"),
    "--out": ("out", str, "output directory: labels.jsonl, metrics.json, calibration.png"),
    **_LABELER_FLAGS,
}
_SWITCHES = ["tags", "cot", "clamp", "force"]


def _add_flags(p: argparse.ArgumentParser, flags: dict[str, tuple[str, Any, str]]) -> None:
    p.add_argument("--config", help="YAML config with the same fields (flags override it)")
    for flag, (dest, typ, help_) in flags.items():
        p.add_argument(flag, dest=dest, type=typ, help=help_, default=None)
    p.add_argument("--tag", dest="tags", action="append", help="only principles with this tag (repeatable)")
    p.add_argument("--engine-option", dest="engine_option", action="append", metavar="KEY=VALUE",
                   help="engine constructor option, e.g. dtype=float32 or batch_size=32 (repeatable)")
    p.add_argument("--cot", action="store_true", default=None, help="chain of thought: reason, then answer")
    p.add_argument("--clamp", nargs=2, type=float, metavar=("LO", "HI"), default=None,
                   help="band for chain-of-thought probabilities (default 0.4 0.6)")
    p.add_argument("--force", action="store_true", default=None, help="move an output written with another config aside")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "label",
        help="label preference pairs with AI feedback (and `cai label eval` against human labels)",
        description="Ask a model each constitution principle's multiple-choice question about two responses, "
        "in both orders, and write a soft label per pair (probability that A is better). Input: --pairs, "
        "--critique or --prompts. Flags override the fields of --config.",
    )
    _add_flags(p, _LABEL_FLAGS)
    p.set_defaults(func=run_label_command)
    sub_label = p.add_subparsers(dest="label_command", metavar="eval")
    e = sub_label.add_parser(
        "eval",
        help="measure agreement, position bias and calibration against human labels",
        description="Label human-labelled pairs (the human-chosen response put in slot A or B by a seeded coin) "
        "and report agreement with the human choice, position-bias rate and expected calibration error; writes "
        "DIR/labels.jsonl, DIR/metrics.json and DIR/calibration.png.",
    )
    _add_flags(e, _EVAL_FLAGS)
    e.add_argument("--skip-malformed", dest="skip_malformed", action="store_true", default=None,
                   help="skip rows whose transcripts cannot be parsed (they are counted) instead of stopping")
    e.set_defaults(func=run_eval_command)


def build_config(args: argparse.Namespace, model: type[BaseModel], flags: dict[str, tuple[str, Any, str]],
                 required: tuple[str, ...], command: str) -> Any:
    from cai.cli.config_args import config_from_args

    fields = [dest for dest, _, _ in flags.values()] + _SWITCHES + ["skip_malformed"]
    return config_from_args(args, model, fields, required, command)


def run_label_command(args: argparse.Namespace) -> int:
    from cai.stages.label import LabelConfig, run_label

    config = build_config(args, LabelConfig, _LABEL_FLAGS, ("constitution", "out"), "cai label")
    summary = run_label(config, progress=not args.quiet)
    print(summary.render())
    print(f"metrics: {config.out}.metrics.json")
    return 0


def run_eval_command(args: argparse.Namespace) -> int:
    from cai.stages.label_eval import EvalConfig, run_label_eval

    config = build_config(args, EvalConfig, _EVAL_FLAGS, ("pairs", "constitution", "out"), "cai label eval")
    summary = run_label_eval(config, progress=not args.quiet)
    print(summary.render())
    out = Path(config.out)
    print(f"wrote {out / 'labels.jsonl'}, {out / 'metrics.json'}, {out / 'calibration.png'}")
    return 0
