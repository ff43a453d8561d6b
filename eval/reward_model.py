"""``align eval reward-model``: accuracy of a reward model checkpoint on a preference file.

    align eval reward-model --model runs/x/round_1/rm_helpful/model --data prefs.jsonl [--batch-size 16]

Reads any preference file in our schema or TRL's (chosen/rejected, ranked ``responses``), scores every
response with ``rewards.scoring.RewardScorer`` (plain transformers) and prints accuracy overall, per
strength and per domain, top-1 accuracy and mean margin (``eval.reward_accuracy``); the last line is
the JSON of those metrics.
"""

from __future__ import annotations

import json
import sys

from data_schemas import DataError, read_jsonl
from eval.reward_accuracy import ranking_accuracy


def evaluate_reward_model(model: str, data: str, batch_size: int = 8, limit: int | None = None,
                          max_length: int | None = None, device: str | None = None) -> dict[str, float]:
    """Score every response of every record of ``data`` and return the accuracy metrics."""
    from rewards.scoring import RewardScorer

    records = read_jsonl(data, "preference", limit=limit)  # DataError names file, line and field
    if not records:
        raise DataError("no records", path=data)
    scorer = RewardScorer.from_pretrained(model, device=device, max_length=max_length)
    prompts = [r.prompt for r in records for _ in r.responses]
    responses = [m for r in records for m in r.responses]
    flat = scorer.score(prompts, responses, batch_size=batch_size)
    scores, k = [], 0
    for r in records:
        scores.append(flat[k : k + len(r.responses)])
        k += len(r.responses)
    metrics = ranking_accuracy(scores, [r.strength for r in records], [r.domain for r in records])
    # responses split from the prompt at the text boundary
    metrics["boundary_adjusted"] = float(scorer.boundary_adjusted)
    return metrics


def _cmd(args) -> int:
    metrics = evaluate_reward_model(args.model, args.data, args.batch_size, args.limit, args.max_length,
                                    args.device)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}", file=sys.stdout)
    print(json.dumps(metrics))
    return 0


def add_command(sub) -> None:
    p = sub.add_parser(
        "reward-model", help="accuracy of a reward model on a preference file",
        description="Score every response of a preference JSONL file (our schema or TRL's) with a reward "
        "model checkpoint (HF sequence classification, num_labels=1) and print accuracy overall, per "
        "strength and per domain, top-1 accuracy and the mean margin; the last line is JSON.",
    )
    p.add_argument("--model", required=True, help="reward model folder (e.g. a reward_model stage's model/)")
    p.add_argument("--data", required=True, help="preference JSONL file")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--limit", type=int, default=None, help="read at most this many records")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate prompt + response to this many tokens (default: what the model was trained "
                   "with, from reward_stats.json; none without it)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.set_defaults(func=_cmd)
