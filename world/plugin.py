"""What the built-in world gives align, by name: the plug-in table that align reads through the entry point
``align.plugins`` (``world = "world.plugin"`` in pyproject.toml; see :mod:`align.plugins` and docs/plugins.md).

Strings only ("module:attribute", or a module): align reads this table while it validates a recipe, without
importing the world's code (nor torch); an entry is imported the first time a stage uses it.
"""

PROVIDES = {
    "reward": {"gold": "world.judge:GOLD_REWARD"},  # reward: {function: gold}
    "sft": {
        "world": "world.generator:sft_records",
        "world_chat": "world.chats:chat_records",
        "world_dialogues": "world.chats:dialogue_records",
    },
    "preferences": {
        "world": "world.generator:world_preference_records",
        "world_helpful": "world.generator:helpful_preference_records",
        "world_safety": "world.generator:safety_preference_records",
    },
    "prompts": {"world": "world.generator:prompt_records", "world_eval": "world.generator:eval_prompt_records"},
    "tokenizer": {"world": "world.tokenizer:build_world_tokenizer"},  # tokenizer: builtin:world
    "evaluator": {"world": "world.evaluator:EVALUATOR"},  # evaluators: [world]
    "instructions": {"world": "world.retention:training_instructions"},  # gatt instructions: {builtin: world}
    "retention": {"world": "world.retention"},  # the evaluation stage's retention check
    "data_command": {"world": "world.cli:add_command"},  # align data world
}
