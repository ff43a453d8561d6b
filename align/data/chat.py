"""Chat format: the Llama 3 template, the built-in byte tokenizer, and conversation -> (ids, loss mask).

The Llama 3 format wraps every turn as
``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``. The header and termination
tokens are the *formatting tokens*: DPO masks them out of its log-prob sums (Llama 3, sec. 4.1.4).

Tokenisation works with any HF tokenizer that has a chat template: the template is rendered for each
prefix of the conversation and the character spans of the assistant turns (content + termination token)
are mapped to tokens through the fast tokenizer's offsets. This needs only that rendering a prefix of
the conversation gives a prefix of the rendered text, which holds for every mainstream template; it is
checked and reported otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"
LLAMA3_SPECIAL_TOKENS = (BOS, EOS, START_HEADER, END_HEADER, EOT, PAD)

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


class ChatFormatError(ValueError):
    """The tokenizer's chat template cannot be used to build loss masks."""


@dataclass(frozen=True)
class TokenizedChat:
    input_ids: list[int]
    loss_mask: list[bool]  # True on assistant tokens (content + termination token)
    cut: int = 0  # tokens cut off the end at max_length

    def __len__(self) -> int:
        return len(self.input_ids)


def build_byte_tokenizer(model_max_length: int = 4096):
    """A byte-level tokenizer made locally (no download): 256 byte tokens + the Llama 3 special tokens.

    Every string round-trips exactly; the vocabulary is 262 ids, so tiny models stay tiny.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for bytes, in a fixed order
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return llama3_chat_tokenizer(core, model_max_length)


def build_builtin_tokenizer(name: str = "builtin:bytes"):
    """A built-in tokenizer by its recipe name: ``builtin:bytes`` (above) or a plug-in's ``builtin:NAME``
    (:mod:`align.plugins`; the built-in world's ``builtin:world``), made locally."""
    if name == "builtin:bytes":
        return build_byte_tokenizer()
    from align import plugins

    plugin = name.removeprefix("builtin:")
    if name.startswith("builtin:") and plugin in plugins.names("tokenizer"):
        return plugins.load("tokenizer", plugin)()
    known = ", ".join(["builtin:bytes", *(f"builtin:{n}" for n in plugins.names("tokenizer"))])
    raise ValueError(f"no built-in tokenizer {name!r} ({known})")


def llama3_chat_tokenizer(core, model_max_length: int = 4096):
    """A ``tokenizers.Tokenizer`` as an HF fast tokenizer with the Llama 3 special tokens and chat template
    (the built-in tokenizers: ``builtin:bytes`` above, the built-in world's ``builtin:world``)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        additional_special_tokens=[START_HEADER, END_HEADER, EOS],
        model_max_length=model_max_length,
    )
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return tok


def _as_dicts(messages: Sequence) -> list[dict]:
    out = []
    for m in messages:
        if isinstance(m, dict):
            out.append({"role": m["role"], "content": m["content"]})
        else:  # pydantic Message
            out.append({"role": m.role, "content": m.content})
    return out


def _role(m) -> str:
    return m["role"] if isinstance(m, dict) else m.role


def _weight(m) -> int | None:
    return m.get("weight") if isinstance(m, dict) else getattr(m, "weight", None)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_char_spans(tokenizer, messages: Sequence) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return (text, [(start, end) char span of each assistant turn])."""
    msgs = _as_dicts(messages)
    text = _render(tokenizer, msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, msgs[:i], add_generation_prompt=True)
        upto = _render(tokenizer, msgs[: i + 1])
        if not (text.startswith(upto) and upto.startswith(before)):
            raise ChatFormatError(
                "the tokenizer's chat template does not render a conversation prefix as a text prefix; "
                "align cannot locate assistant turns with it (set a Llama 3 style template)"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def tokenize_chat(tokenizer, messages: Sequence, max_length: int | None = None) -> TokenizedChat:
    """Conversation -> token ids and a loss mask that is True on assistant tokens only.

    The mask covers each assistant turn's content and its termination token (``<|eot_id|>``), so the
    model learns to stop; headers, system and user turns are excluded, and so are assistant turns with
    ``weight: 0`` (context only, e.g. the earlier turns of a Ghost Attention dialogue). Truncates to
    ``max_length`` (``cut``: how many tokens that removed).
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    trained = [_weight(m) != 0 for m in messages if _role(m) == "assistant"]
    spans = [span for span, keep in zip(spans, trained, strict=True) if keep]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [False] * len(ids)
    k = 0
    for t, (start, _end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k < len(spans) and spans[k][0] <= start < spans[k][1]:
            mask[t] = True
    cut = 0
    if max_length is not None and len(ids) > max_length:
        cut = len(ids) - max_length
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenizedChat(list(ids), mask, cut)


def tokenize_prompt(tokenizer, messages: Sequence) -> list[int]:
    """Prompt -> ids ending with the assistant header, ready for generation."""
    text = _render(tokenizer, _as_dicts(messages), add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def formatting_ids(tokenizer, setting) -> frozenset[int]:
    """DPO's ``formatting_tokens`` setting -> the ids masked out of its loss: ``off`` none, ``auto`` the
    template's (:func:`formatting_token_ids`), or the listed tokens."""
    if setting == "off":
        return frozenset()
    return formatting_token_ids(tokenizer, None if setting == "auto" else setting)


def formatting_token_ids(tokenizer, explicit: Sequence[str] | None = None) -> frozenset[int]:
    """Ids of the chat format's header and termination tokens (what DPO masks).

    ``explicit``: token strings to use instead of the automatic choice. Automatic: every special /
    added token of the tokenizer that the chat template emits around a sample conversation.
    """
    if explicit is not None:
        ids = tokenizer.convert_tokens_to_ids(list(explicit))
        unknown = [t for t, i in zip(explicit, ids, strict=True) if i is None or i == tokenizer.unk_token_id]
        if unknown:
            raise ChatFormatError(f"formatting tokens not in the vocabulary: {unknown}")
        return frozenset(ids)
    sample = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    ids = tokenizer(_render(tokenizer, sample), add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return frozenset(i for i in ids if i in special)


def termination_token_id(tokenizer) -> int:
    """The id that ends an assistant turn (``<|eot_id|>`` for Llama 3 templates)."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    if eot is not None and eot != tokenizer.unk_token_id:
        return eot
    return tokenizer.eos_token_id
