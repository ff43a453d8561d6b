"""``builtin:world``: a byte-level BPE tokenizer learned from the built-in world's text, made locally.

The byte tokenizer (``builtin:bytes``) spends a token on every character, so the built-in world's chats are
~2.5x longer than they need to be and every stage of the default round pays for it. This one keeps the
byte-level alphabet (every string still round-trips exactly, nothing is out of vocabulary) and the Llama 3
special tokens and chat template, and adds BPE merges learned from a fixed sample of the world's SFT chats
and preference answers, so the same tiny model reads and writes whole words ("Ġanswer", "Ġminus").

It is trained from a fixed corpus (its own seed, not the run's), so every run and every process builds the
same tokenizer; checkpoints save it like any HF tokenizer.
"""

from __future__ import annotations

from functools import lru_cache

WORLD_VOCAB_SIZE = 512
_CORPUS_SEED = 999  # the corpus the merges are learned from; independent of any run's seed
_CORPUS_CHATS = 3000
_CORPUS_PREFERENCES = 2000


def _corpus(byte_tokenizer) -> list[str]:
    from world.generator import preference_records, sft_records

    texts = [byte_tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in r.messages],
                                                tokenize=False)
             for r in sft_records(_CORPUS_CHATS, seed=_CORPUS_SEED)]
    for record in preference_records(_CORPUS_PREFERENCES, seed=_CORPUS_SEED):
        texts.extend(response.content for response in record.responses)
    return texts


@lru_cache(maxsize=4)
def _trained(vocab_size: int) -> str:
    """The trained core tokenizer as JSON (cached: built once per process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    from align.data.chat import LLAMA3_SPECIAL_TOKENS, build_byte_tokenizer

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=ByteLevel.alphabet(),
                                  special_tokens=list(LLAMA3_SPECIAL_TOKENS), show_progress=False)
    core.train_from_iterator(_corpus(build_byte_tokenizer()), trainer)
    return core.to_str()


def build_world_tokenizer(vocab_size: int = WORLD_VOCAB_SIZE, model_max_length: int = 4096):
    """The ``builtin:world`` tokenizer: byte-level BPE of ``vocab_size`` ids with the Llama 3 chat format."""
    from tokenizers import Tokenizer

    from align.data.chat import LLAMA3_SPECIAL_TOKENS, llama3_chat_tokenizer

    if vocab_size < 256 + len(LLAMA3_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is below the 256 bytes + {len(LLAMA3_SPECIAL_TOKENS)} "
                         "special tokens")
    return llama3_chat_tokenizer(Tokenizer.from_str(_trained(vocab_size)), model_max_length)
