"""What this package gives align by name (entry point ``align.plugins``: ``rewards = "rewards.plugins"``;
strings only, read without importing the code behind them; see :mod:`align.plugins`)."""

PROVIDES = {
    "reward": {"sentiment": "rewards.sentiment:SENTIMENT_REWARD"},  # reward: {function: sentiment}
    "evaluator": {"sentiment": "rewards.sentiment:SENTIMENT_EVALUATOR"},  # evaluators: [sentiment]
}
