"""What the eval package gives align by name (entry point ``align.plugins``: ``eval = "eval.plugins"``;
strings only: :mod:`align.plugins`)."""

PROVIDES = {
    "evaluator": {"diversity": "eval.diversity:DIVERSITY_EVALUATOR"},  # evaluators: [diversity]
}
