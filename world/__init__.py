"""The built-in world: a small universe of tasks whose answers code can judge exactly, for experiments
without downloads or human labels.

- :mod:`world.tasks`: the task families, instructions and how text is parsed into them;
- :mod:`world.judge`: the gold judge (and the reward function ``gold``);
- :mod:`world.generator`, :mod:`world.chats`: the data sets (SFT chats, ranked preferences, prompt pools,
  held-out evaluation prompts, long dialogues), deterministic by seed;
- :mod:`world.evaluator`: the gold metrics of a policy's answers, and the evaluator ``world``;
- :mod:`world.retention`: multi-turn instruction retention and GAtt's instruction pool;
- :mod:`world.tokenizer`: ``builtin:world``, a byte-level BPE learned from the world's text;
- :mod:`world.cli`: ``align data world``.

It is a plug-in of align (:mod:`world.plugin`): align reaches it only by the names that table gives, the
same way it reaches a user's own reward function, data or evaluator. Importing this package imports nothing.
"""
