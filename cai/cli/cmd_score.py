"""`cai score MODEL --file FILE`: score pairs or texts with a trained reward model."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from cai.errors import CaiError, InputError

GROUP = None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score preference pairs or texts with a trained reward model",
        description="Rows with chosen/rejected (preference rows, prompt/chosen/rejected, HH transcripts) are scored "
        "as pairs and the accuracy against the label is printed; rows with `messages` (ending with the assistant "
        "turn), `prompt` + `response`/`completion`, or `text` (already rendered) get one reward each. MODEL is a "
        "trained reward model directory (a run's out_dir uses its final/).",
    )
    p.add_argument("model", help="reward model directory (final/, a checkpoint, or a run's out_dir)")
    p.add_argument("--file", required=True, help="JSONL (.gz), .json, .parquet or .csv of pairs or texts")
    p.add_argument("--out", help="write each row with its reward(s) added, as JSONL")
    p.add_argument("--normalize", action="store_true", help="report (r - mean) / std with the training statistics")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024, help="tokens per sequence; prompts are cut from the left")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or auto")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.set_defaults(func=run_score_command)


def _model_dir(path: str) -> str:
    p = Path(path)
    if (p / "final" / "config.json").is_file() and not (p / "config.json").is_file():
        return str(p / "final")
    return path


def require_trained_head(model: str) -> None:
    """Refuse a model without a trained score head: loading a plain language model as a reward model
    gives it a random head, whose 'rewards' and accuracy would look like results but mean nothing."""
    from transformers import AutoConfig

    if not Path(model).exists() and model.startswith(("/", ".", "~")):
        raise CaiError(f"reward model {model} does not exist; give the directory `cai train rm` wrote "
                       "(its out_dir, or out_dir/final)")
    try:
        cfg = AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError):
        return  # not a loadable model: the loader says why
    if not any(a.endswith("ForSequenceClassification") for a in cfg.architectures or []):
        kinds = ", ".join(cfg.architectures or ["unknown"])
        raise CaiError(f"{model} is not a trained reward model ({kinds} has no trained score head), so its "
                       "scores would come from a random head. Score with the directory `cai train rm` wrote "
                       "(its out_dir, or out_dir/final), or train one first: cai train rm CONFIG.yaml")


def _text_item(row: dict[str, Any], path: str, line: int) -> tuple[str, Any]:
    """('text', str) or ('messages', conversation ending with the assistant turn)."""
    if isinstance(row.get("text"), str):
        return "text", row["text"]
    if isinstance(row.get("messages"), list):
        return "messages", row["messages"]
    response = row.get("response", row.get("completion"))
    if "prompt" in row and response is not None:
        prompt = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
        if isinstance(response, list):
            return "messages", list(prompt) + list(response)
        return "messages", list(prompt) + [{"role": "assistant", "content": response}]
    raise InputError(path, "expected chosen/rejected (a pair), messages, prompt + response/completion, or text",
                     line=line)


def run_score_command(args: argparse.Namespace) -> int:
    from cai.stages.inputs import iter_rows
    from cai.stages.pairs import human_pair_from_row
    from cai.train.reward import RewardScorer, pair_correct

    if args.batch_size < 1 or args.max_length < 8:
        raise CaiError("--batch-size must be >= 1 and --max-length >= 8")
    rows = []
    for line, row in iter_rows(args.file):
        if args.limit is not None and len(rows) >= args.limit:
            break
        rows.append((line, row))
    if not rows:
        raise InputError(args.file, "no rows")
    model_dir = _model_dir(args.model)
    require_trained_head(model_dir)
    is_pair = ["chosen" in r and "rejected" in r for _, r in rows]
    if any(is_pair) and not all(is_pair):
        raise InputError(args.file, "mixes pairs (chosen/rejected) and single texts; score them in separate files")
    scorer = RewardScorer(model_dir, device=args.device, dtype=args.dtype,
                          batch_size=args.batch_size, max_length=args.max_length, normalize=args.normalize)
    results: list[dict[str, Any]] = []
    if all(is_pair):
        import torch

        pairs = [human_pair_from_row(r, args.file, line) for line, r in rows]
        convs = []
        for p in pairs:
            ctx = [m.model_dump() for m in p.prompt]
            convs += [ctx + [{"role": "assistant", "content": p.chosen}], ctx + [{"role": "assistant", "content": p.rejected}]]
        scores = scorer.score_messages(convs)
        rc, rr = torch.tensor(scores[0::2]), torch.tensor(scores[1::2])
        correct = pair_correct(rc - rr, torch.tensor([p.label_prob for p in pairs]))
        for (_, row), a, b, c in zip(rows, rc.tolist(), rr.tolist(), correct.tolist()):
            results.append({**row, "reward_chosen": a, "reward_rejected": b, "correct": None if math.isnan(c) else bool(c)})
        judged = correct[~torch.isnan(correct)]
        acc = float(judged.mean()) if judged.numel() else float("nan")
        print(f"{len(pairs)} pairs: accuracy {acc:.4f} (reward ranks chosen above rejected), "
              f"mean margin {float((rc - rr).mean()):.4f}, reward chosen {float(rc.mean()):.4f}, "
              f"rejected {float(rr.mean()):.4f}")
    else:
        items = [_text_item(r, args.file, line) for line, r in rows]
        texts = [(i, v) for i, (k, v) in enumerate(items) if k == "text"]
        convs = [(i, v) for i, (k, v) in enumerate(items) if k == "messages"]
        scores = [0.0] * len(items)
        for (i, _), s in zip(texts, scorer.score([v for _, v in texts]) if texts else []):
            scores[i] = s
        for (i, _), s in zip(convs, scorer.score_messages([v for _, v in convs]) if convs else []):
            scores[i] = s
        results = [{**row, "reward": s} for (_, row), s in zip(rows, scores)]
        mean = sum(scores) / len(scores)
        std = (sum((s - mean) ** 2 for s in scores) / max(1, len(scores) - 1)) ** 0.5
        print(f"{len(scores)} texts: reward mean {mean:.4f}, std {std:.4f}, min {min(scores):.4f}, max {max(scores):.4f}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {out}")
    return 0
