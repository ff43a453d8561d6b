"""A user's own evaluators, as a recipe names them by dotted path: ``tests.user_evaluators:answer_length``."""


def answer_length(prompts, responses) -> dict[str, float]:
    """The plain protocol: one answer per prompt -> metrics."""
    return {"answer_chars": sum(len(r) for r in responses) / max(len(responses), 1), "answers": float(len(responses))}


class LengthJudge:
    """With a per-answer ``score``: rejection sampling reports length_best_mean, length_sample_mean and
    length_first_mean, the evaluation stage writes it as each answer's score."""

    name = "length"

    def __call__(self, prompts, responses) -> dict[str, float]:
        return {"length_mean": sum(len(r) for r in responses) / max(len(responses), 1)}

    def score(self, prompts, responses) -> list[float]:
        return [float(len(r)) for r in responses]


LENGTH_JUDGE = LengthJudge()
NOT_CALLABLE = 3


def _length_reward():
    from rewards.protocol import PerSampleReward

    return PerSampleReward(lambda prompt, response: len(response) / 10)


LENGTH_REWARD = _length_reward()  # reward: {function: tests.user_evaluators:LENGTH_REWARD}: longer is better
SHORT_REWARD = __import__("rewards.protocol", fromlist=["PerSampleReward"]).PerSampleReward(
    lambda prompt, response: -len(response))  # shorter is better: the length judge's exact opposite
