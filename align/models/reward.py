"""The reward model: a causal LM backbone with a scalar head, as an HF sequence-classification model.

Built from any causal LM checkpoint (a local path, a hub id, an earlier stage's output, or the built-in
tiny Llama): ``AutoModelForSequenceClassification`` with ``num_labels=1`` takes the backbone weights
and adds a freshly initialised linear head (``score``). A checkpoint that is already a one-label reward
model keeps its head. Saved with ``save_pretrained``, so plain ``transformers`` loads it as a
sequence-classification model and scores a (prompt + response) row at its last non-pad token; the pad
token is made distinct from every token the chat template writes, so that token is the response's
end-of-turn token, where training reads the score too.

With LoRA (peft task type SEQ_CLS) the head stays fully trainable (``modules_to_save``).
"""

from __future__ import annotations

import torch
from torch import nn

from align.checksums import verify_model_folder
from align.compat import enable_activation_checkpointing
from align.config.specs import ModelSpec
from align.data.chat import PAD
from align.data.collate import length_sorted_groups
from align.data.ranking import collate_ranked
from align.models.gguf import hf_folder
from align.models.inference import no_grad_map
from align.models.loading import _DTYPES, BUILTIN_MODEL, build_tiny_model, load_tokenizer, lora_config
from align.models.trunk import hidden_from


def load_reward_tokenizer(spec: ModelSpec, model_path: str):
    """The tokenizer, with a pad token that never occurs in a rendered conversation."""
    return ensure_distinct_pad(load_tokenizer(spec, model_path))


def ensure_distinct_pad(tokenizer):
    """When the pad token is unset or a token the chat template writes (e.g. pad = eos = ``<|eot_id|>``),
    make it ``<|finetune_right_pad_id|>`` if the vocabulary has it, else a special token the template never
    writes (SmolLM2: ``<|endoftext|>``), and only when there is none add ``<|finetune_right_pad_id|>`` (which
    grows the embeddings by a row): HF sequence classification reads the score at the last token that is
    not the pad token."""
    sample = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    rendered = set(tokenizer.apply_chat_template(sample, tokenize=True, return_dict=True)["input_ids"])
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in rendered:
        vocab = tokenizer.get_vocab()
        if PAD in vocab:
            tokenizer.pad_token = PAD
            return tokenizer
        # a special token the template never writes (e.g. SmolLM2's <|endoftext|>): no new embedding row
        unused = [t for t in tokenizer.all_special_tokens if vocab.get(t) is not None and vocab[t] not in rendered]
        unused.sort(key=lambda t: (("pad" not in t.lower()), ("endoftext" not in t.lower()), vocab[t]))
        if unused:
            tokenizer.pad_token = unused[0]
        else:
            tokenizer.add_special_tokens({"pad_token": PAD})
            tokenizer.pad_token = PAD
    return tokenizer


def seq_cls_from_causal(causal_lm, seed: int = 0):
    """A one-label sequence-classification model sharing ``causal_lm``'s backbone weights (copied)."""
    from transformers import AutoModelForSequenceClassification

    config = causal_lm.config.__class__.from_dict(causal_lm.config.to_dict())
    config.num_labels = 1
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
    model.base_model.load_state_dict(causal_lm.base_model.state_dict())
    return model.to(next(causal_lm.parameters()).dtype)


def load_reward_model(spec: ModelSpec, model_path: str, tokenizer, seed: int = 0):
    """A reward model ready to train: loaded or built, embeddings sized to the tokenizer, pad id set,
    LoRA and gradient checkpointing applied as asked."""
    if model_path == BUILTIN_MODEL:
        model = seq_cls_from_causal(build_tiny_model(spec, len(tokenizer), seed), seed)
    else:
        from transformers import AutoModelForSequenceClassification

        kwargs = {"dtype": _DTYPES[spec.dtype], "num_labels": 1}
        if spec.attn_implementation:
            kwargs["attn_implementation"] = spec.attn_implementation
        folder = hf_folder(spec, model_path)
        verify_model_folder(folder)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # the new head's initialisation
            model = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if spec.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    if spec.lora is not None:
        from align.compat import get_peft_model

        if spec.gradient_checkpointing:
            model.enable_input_require_grads()
        # SEQ_CLS keeps the head ("score") trainable
        model = get_peft_model(model, lora_config(spec.lora, model, "SEQ_CLS"))
        float32_head(model)
    return model


def float32_head(model: nn.Module) -> bool:
    """A LoRA reward / value model loaded in bf16 or fp16 (``dtype``): its trainable head moves to float32,
    so the optimizer's small updates do not round away (bf16 keeps 8 bits of mantissa; peft keeps the adapters
    themselves in float32), and scores it in float32 from the decoder's half-precision hidden states.
    -> whether it moved."""
    _, head = backbone_and_head(model)
    if not any(p.requires_grad and p.dtype in (torch.bfloat16, torch.float16) for p in head.parameters()):
        return False
    head.float()
    head.register_forward_pre_hook(lambda module, args: tuple(a.float() if torch.is_tensor(a) else a for a in args))
    return True


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack and the scalar head of an HF sequence-classification model (PEFT or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None)
    if head is None:
        head = getattr(base, "classifier", None)
    if head is None:
        raise ValueError(f"{type(base).__name__} has no 'score' or 'classifier' head")
    return getattr(base, base.base_model_prefix), head


class PackedRewards(nn.Module):
    """``forward(input_ids, position_ids, attention_mask, last_index) -> (R,)`` float32 scores.

    The decoder runs over shared-prompt rows (``align.data.shared_prompt``: one row per prompt with
    all its responses, block mask); the head only on each response's last token (``last_index``: flat
    positions into B*T).
    """

    prune_last_layer = True  # the last decoder layer at the last tokens only (align.models.last_layer)

    def __init__(self, model: nn.Module, trunk_layers: int = 0):
        super().__init__()
        self.model = model
        self.trunk_layers = trunk_layers  # what a ``trunk`` argument holds: the states after these layers

    def forward(self, input_ids, position_ids, attention_mask, last_index, trunk=None):
        """``trunk``: (B, T, H) the states after the first ``trunk_layers`` (frozen) decoder layers
        (:mod:`align.models.trunk`): only the layers above them run."""
        decoder, head = backbone_and_head(self.model)
        selected = hidden_from(decoder, last_index, trunk, self.trunk_layers, prune=self.prune_last_layer,
                               input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)
        return head(selected).squeeze(-1).float()  # (R,)


def whiten_value_head(value_model, path: str, whiten: bool) -> None:
    """A value model that starts from a reward model predicts the RM's raw score; the reward PPO sees is
    whitened, (r - mean) / std (``whiten``: the RM's ``reward_stats.json`` in ``path`` is applied). Scale
    the head (and shift its bias, if it has one) so the value starts on the reward's scale: without this,
    value errors of several reward standard deviations swamp GAE."""
    from pathlib import Path

    from rewards.whitening import RewardStats

    stats = RewardStats.load(path) if Path(path).is_dir() else None
    if stats is None or not whiten:
        return
    _, head = backbone_and_head(value_model)
    with torch.no_grad():
        head.weight.div_(stats.std)
        if getattr(head, "bias", None) is not None:
            head.bias.sub_(stats.mean).div_(stats.std)


def score_ranked(model, examples, batch_size: int, pad_id: int, device, dtype=torch.float32, trunks=None):
    """Scores of every ranked example's responses (best first), in order: list of lists of floats.
    ``trunks``: per example, its states after the model's ``trunk_layers`` (:class:`PackedRewards`)."""
    out = [None] * len(examples)

    def make_batch(group):
        chosen = [trunks[i] for i in group] if trunks is not None else None
        return collate_ranked([examples[i] for i in group], pad_id, dtype, chosen).to(device)

    groups = length_sorted_groups([len(e) for e in examples], batch_size)
    for group, (batch, scores) in zip(groups, no_grad_map(model, groups, make_batch,
                                                         lambda m, b: m(*b.model_inputs())), strict=True):
        flat = scores.tolist()
        for i, n in zip(group, batch.responses_per_prompt, strict=True):
            out[i] = flat[:n]
            flat = flat[n:]
    return out
