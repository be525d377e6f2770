"""`cai eval`: policies answer held-out prompts; the AI judge rates them on harmlessness and
helpfulness (Elo with intervals) and checks their replies for over-refusal."""

from __future__ import annotations

import argparse
from typing import Any

from cai.errors import CaiError

GROUP = None

_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--red-team": ("red_team", str, "held-out red-team prompts (default examples/eval/red_team.jsonl)"),
    "--red-team-skip": ("red_team_skip", int, "leave out the first N red-team prompts (those used in training)"),
    "--red-team-limit": ("red_team_limit", int, "then use at most N"),
    "--helpful": ("helpful", str, "held-out helpful prompts (default examples/eval/helpful.jsonl)"),
    "--helpful-limit": ("helpful_limit", int, "use at most N helpful prompts"),
    "--benign": ("benign", str, "benign but sensitive-looking prompts (default examples/eval/benign.jsonl)"),
    "--harmful": ("harmful", str, "harmful prompts (default examples/eval/harmful.jsonl)"),
    "--refusal-limit": ("refusal_limit", int, "use the first N benign and N harmful prompts"),
    "--judge-model": ("judge_model", str, "the AI judge (default: bundled Gemma 3 270M)"),
    "--engine": ("engine", str, "hf (default) or vllm"),
    "--principles": ("principles", int, "principles drawn per judged pair (default 2)"),
    "--max-new-tokens": ("max_new_tokens", int, "answer length (default 128)"),
    "--temperature": ("temperature", float, "answer sampling temperature (default 0.7; 0 = greedy)"),
    "--batch-size": ("batch_size", int, "prompts or pairs per engine call (default 8)"),
    "--bootstrap": ("bootstrap", int, "bootstrap refits for the 95%% intervals (default 200)"),
    "--seed": ("seed", int, "run seed (default 0)"),
    "--out": ("out", str, "output directory (rerun to resume)"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="rate policies on harmlessness and helpfulness (Elo) and measure over-refusal",
        description="Every --policy answers held-out red-team and helpful prompts and the over-refusal "
        "prompts; the AI judge compares every two policies' answers (both orders, soft labels) under "
        "constitutions/harmless.yaml (red-team) and constitutions/helpful-honest.yaml (helpful), and asks "
        "of each benign/harmful reply whether it refuses. Writes OUT/elo.json, OUT/refusals.json, "
        "OUT/elo.png and resumable OUT/{answers,judged,refusals}.jsonl. Flags override --config.",
    )
    p.add_argument("--config", help="YAML config with the same fields (flags override it)")
    p.add_argument("--policy", dest="policy", action="append", metavar="NAME=MODEL",
                   help="a policy: a name and a model dir, run checkpoint or hub id (repeatable, at least 2)")
    for flag, (dest, typ, help_) in _FLAGS.items():
        p.add_argument(flag, dest=dest, type=typ, help=help_, default=None)
    p.add_argument("--no-refusals", action="store_true", help="skip the over-refusal check")
    p.add_argument("--engine-option", dest="engine_option", action="append", metavar="KEY=VALUE",
                   help="engine constructor option (repeatable)")
    p.add_argument("--force", action="store_true", default=None, help="move outputs written with another config aside")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_eval_command)


def _policies(items: list[str]) -> list[dict[str, str]]:
    out = []
    for item in items:
        name, sep, model = item.partition("=")
        if not sep or not name or not model:
            raise CaiError(f"--policy {item!r}: write --policy NAME=MODEL, e.g. --policy sft=out/run/sft/final")
        out.append({"name": name, "model": model})
    return out


def run_eval_command(args: argparse.Namespace) -> int:
    from cai.cli.config_args import config_from_args
    from cai.stages.eval import PolicyEvalConfig, run_policy_eval

    if args.policy:
        args.policies = _policies(args.policy)
    fields = [dest for dest, _, _ in _FLAGS.values()] + ["policies", "force"]
    config = config_from_args(args, PolicyEvalConfig, fields, ("policies", "out"), "cai eval")
    if args.no_refusals:
        config = config.model_copy(update={"benign": None, "harmful": None})
    summary = run_policy_eval(config, progress=not args.quiet)
    print(summary.render())
    print(f"wrote {config.out}/elo.json, elo.png" + (", refusals.json" if summary.refusals else ""))
    return 0
