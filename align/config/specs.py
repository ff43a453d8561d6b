"""Building-block config models shared by stages. Pydantic only: importing this never imports torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from align import plugins

OWN_TOKENIZERS = ("builtin:bytes",)  # made by align.data.chat.build_byte_tokenizer


def builtin_tokenizers() -> tuple[str, ...]:
    """Recipe names of the tokenizers made locally: align's, then the plug-ins' (``builtin:NAME``)."""
    return OWN_TOKENIZERS + tuple(f"builtin:{n}" for n in plugins.names("tokenizer"))


def plugin_name(kind: str) -> AfterValidator:
    """Validates a field naming an entry of :mod:`align.plugins` of ``kind`` (None passes)."""

    def check(value: str | None) -> str | None:
        why = plugins.problem(kind, value) if value is not None else None
        if why is not None:
            raise ValueError(why)
        return value

    return AfterValidator(check)


def _evaluator_names(names: list[str]) -> list[str]:
    problems = [why for name in names if (why := plugins.problem("evaluator", name)) is not None]
    if problems:
        raise ValueError("; ".join(problems))
    return names


# A stage's ``evaluators`` (align.evaluators): a plug-in's names or dotted paths, all checked at validation.
EvaluatorNames = Annotated[list[str], AfterValidator(_evaluator_names)]
EVALUATORS_HELP = ("evaluators of the responses, whose metrics join the stage's (align.evaluators): a plug-in's "
                   "name (world: the built-in world's gold judge) or a dotted path 'package.module:name'")


class Strict(BaseModel):
    """Base for every config model: unknown keys are errors, fields are validated on assignment, and no
    number may be inf or nan (``lr: .inf`` used to train an all-NaN model)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              allow_inf_nan=False)


class TinyModelConfig(Strict):
    """Size of the built-in randomly initialised Llama model (``model.path: builtin:tiny``)."""

    hidden_size: int = Field(64, gt=0, description="width of the residual stream")
    intermediate_size: int = Field(176, gt=0, description="MLP width")
    num_hidden_layers: int = Field(2, gt=0, description="number of decoder layers")
    num_attention_heads: int = Field(4, gt=0, description="attention heads")
    num_key_value_heads: int = Field(2, gt=0, description="key/value heads (GQA)")
    max_position_embeddings: int = Field(1024, gt=0, description="longest sequence")
    tie_word_embeddings: bool = Field(True, description="share input and output embeddings")


class LoraConfig(Strict):
    """LoRA adapters (peft). The saved checkpoint is the merged model plus the adapter in ``adapter/``."""

    r: int = Field(16, gt=0, description="adapter rank")
    alpha: int = Field(32, gt=0, description="scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, or all-linear"
    )
    last_layers: int | None = Field(
        None, gt=0, description="adapt only the last N decoder layers (peft's layers_to_transform); the "
        "layers below get no gradient, so the backward pass stops at them (about 2x faster training of "
        "SmolLM2-135M on a CPU with 8 of 30). null: every layer",
    )


PREV = "prev."  # a reference to a stage of the previous round: "prev.dpo"


def as_refs(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _only_previous_round(refs: list[str]) -> bool:
    return bool(refs) and all(r.startswith(PREV) for r in refs)


class StageRef(Strict):
    """An earlier stage's output by reference alone, for something a stage does when that stage has run and
    skips when it has not (a 'prev.' stage in round 1)."""

    from_stage: str | list[str] = Field(
        ..., alias="from", description="stage(s) to read ('NAME' this round, 'prev.NAME' the previous round); "
        "the first that has run is used, none: skipped",
    )


class ModelSpec(Strict):
    """Where a model comes from: a path or hub id, the built-in tiny model, or an earlier stage's output.

    ``from`` may list several stages: the first one that has run is used (``[prev.dpo, sft]``: the
    previous round's DPO model, or in round 1 this round's SFT model). ``path`` together with a
    ``prev.`` reference is the round-1 fallback.
    """

    path: str | None = Field(
        None, description="local directory or hub id for from_pretrained; 'builtin:tiny' for the built-in model"
    )
    from_stage: str | list[str] | None = Field(
        None, alias="from",
        description="an earlier stage whose checkpoint to start from ('NAME' this round, 'prev.NAME' the "
        "previous round); a list means the first that exists",
    )
    tokenizer: str | None = Field(
        None, description="tokenizer path or hub id (default: the model's; for builtin:tiny 'builtin:bytes', "
        "256 byte ids, or 'builtin:world', a 512-id byte-level BPE learned from the built-in world: 2.5x fewer "
        "tokens for the same text)"
    )
    gguf_file: str | None = Field(
        None, description="a GGUF file in 'path' (e.g. SmolLM2-135M-Instruct.Q4_1.gguf): converted once to a "
        "plain HF folder (weights dequantized, tokenizer and chat template from the file; needs the gguf "
        "package, extra align[gguf])",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="size of builtin:tiny")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="dtype the weights are loaded in"
    )
    attn_implementation: str | None = Field(None, description="e.g. sdpa, eager, flash_attention_2")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters instead of all weights")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save memory")

    @model_validator(mode="after")
    def _one_source(self):
        refs = as_refs(self.from_stage)
        if self.path is None and not refs:
            raise ValueError("give 'path' or 'from'")
        if self.gguf_file is not None and (self.path is None or self.path.startswith("builtin:")):
            raise ValueError("gguf_file needs 'path': the folder that holds the file")
        if self.path == "builtin:tiny" and self.tokenizer not in (None, *builtin_tokenizers()):
            raise ValueError(f"path builtin:tiny goes with a built-in tokenizer ({' or '.join(builtin_tokenizers())})")
        if self.path is not None and refs and not _only_previous_round(refs):
            raise ValueError("give exactly one of 'path' and 'from' (a path may only back up 'prev.' references)")
        if _only_previous_round(refs) and self.path is None:
            raise ValueError(
                "'from' names only previous-round stages, which round 1 does not have: add a same-round "
                "stage to the list or a 'path' to start from"
            )
        return self


class HFSource(Strict):
    """A Hugging Face ``datasets`` source: a hub id, a ``save_to_disk`` folder, or a Parquet / Arrow / JSON(L) /
    CSV file."""

    path: str = Field(..., description="hub id, save_to_disk folder, or a .parquet/.arrow/.json/.jsonl/.csv file")
    name: str | None = Field(None, description="the hub data set's configuration (subset)")
    split: str = Field("train", description="split to read (a file is one split)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")


class ContinuationSource(Strict):
    """Continuation prompts made from the human-written text of ``paths`` (the DPO paper's sentiment task;
    :mod:`align.data.continuation`): the first words of each assistant message, in a user turn asking to
    continue them. Conversations go whole to train or held-out, so no prefix is in both splits."""

    split: Literal["train", "heldout"] = Field(..., description="which side of the split this stage reads")
    heldout: int = Field(256, gt=0, description="prefixes held out (the same number gives the same split)")
    min_words: int = Field(6, gt=0, description="shortest prefix, in words")
    max_words: int = Field(12, gt=0, description="longest prefix, in words")
    per_record: int = Field(2, gt=0, description="prefixes from one conversation at most")
    sources: list[str] = Field(["human"], description="read rows whose 'source' contains one of these")
    exclude: list[str] = Field(["gsm8k"], description="and none of these")

    @model_validator(mode="after")
    def _words(self):
        if self.min_words > self.max_words:
            raise ValueError("min_words is above max_words")
        return self


class DataSpec(Strict):
    """Where records come from: JSONL files (our schema or TRL's format), a built-in set, or a stage."""

    paths: list[str] = Field(default_factory=list, description="JSONL files, read in order")
    from_stage: str | list[str] | None = Field(
        None, alias="from",
        description="earlier stage(s) whose data output to read ('NAME' this round, 'prev.NAME' the "
        "previous round; a 'prev.' stage is skipped in round 1); all listed outputs are read",
    )
    accumulate: bool = Field(
        False, description="also read the outputs of the same stages in every earlier round"
    )
    builtin: str | None = Field(
        None, description="a built-in data set, e.g. 'chat' (generated, no download); with 'paths' or 'from' "
        "too, its records come first, then theirs (e.g. replaying the SFT chats beside an earlier stage's data)",
    )
    builtin_size: int = Field(512, gt=0, description="records to generate for a built-in set")
    hf: HFSource | None = Field(
        None, description="records from Hugging Face datasets (after the built-in set, before the files): "
        "{path: ID_OR_FILE_OR_FOLDER, name:, split:, revision:}; every row validated as a JSONL row would be",
    )
    continuation: ContinuationSource | None = Field(
        None, description="prompts only: read 'paths' as human-written chats and make continuation prompts of "
        "them: {split: train|heldout, heldout: 256, min_words: 6, max_words: 12, per_record: 2}",
    )
    limit: int | None = Field(None, gt=0, description="read at most this many records (the first ones)")
    sample: int | None = Field(
        None, gt=0, description="then keep a random subset of this many records (seeded, file order kept): "
        "a representative slice of a file whose records are grouped by source",
    )
    skip_bad_rows: bool = Field(False, description="skip rows that fail validation (count reported)")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="fraction held out for evaluation")
    train_sample: int | None = Field(
        None, gt=0, description="after the held-out split, train on this many of the training records (a seeded "
        "sample; a smaller one is part of a larger one): a curve of accuracy against training data on one "
        "held-out split",
    )
    mix: list[DataSpec] = Field(
        default_factory=list, description="instead of one source, several with weights (Llama 2 mixed its "
        "own preference data with open data at set ratios): each part {paths: [...] or builtin: ..., weight: W}; "
        "the records keep the total size of the parts, each part drawn to its weight's share (seeded, with "
        "repeats where a part has fewer records than its share), so the proportions hold in every epoch",
    )
    weight: float | None = Field(None, gt=0, description="a mix part's relative share of the records")

    @field_validator("paths")
    @classmethod
    def _no_duplicates(cls, paths: list[str]) -> list[str]:
        seen: dict[Path, str] = {}
        for p in paths:
            resolved = Path(p).expanduser().resolve()
            if resolved in seen:
                first = seen[resolved]
                same = "" if first == p else f" (as '{first}' and '{p}')"
                raise ValueError(f"lists '{p}' twice{same}; each file is read once: remove the repeat")
            seen[resolved] = p
        return paths

    @model_validator(mode="after")
    def _one_source(self):
        refs = as_refs(self.from_stage)
        if self.mix:
            return self._mix_checks(refs)
        if self.builtin is None and self.hf is None and not self.paths and not refs:
            raise ValueError("give 'paths', 'from', 'builtin', 'hf' or 'mix'")
        if self.continuation is not None and (refs or self.builtin is not None or self.hf is not None
                                              or not self.paths):
            raise ValueError("'continuation' makes prompts of the chats in 'paths': give 'paths' and no other source")
        if _only_previous_round(refs) and not self.paths and self.builtin is None and self.hf is None:
            raise ValueError(
                "'from' names only previous-round stages, which round 1 does not have: add 'paths' or a "
                "same-round stage"
            )
        return self


    def _mix_checks(self, refs: list[str]):
        if self.paths or refs or self.builtin is not None or self.hf is not None or self.continuation:
            raise ValueError("give 'mix' alone: its parts name the files, hf sources and built-in sets")
        for k, part in enumerate(self.mix):
            if part.weight is None:
                raise ValueError(f"mix[{k}]: give its 'weight'")
            if part.mix or part.from_stage is not None:
                raise ValueError(f"mix[{k}]: a part reads files ('paths') or a built-in set, not a stage or another mix")
            if part.eval_fraction or part.skip_bad_rows or part.train_sample:
                raise ValueError(f"mix[{k}]: eval_fraction, train_sample and skip_bad_rows belong to the mix, not a part")
        return self


Beta = Annotated[float, Field(ge=0, lt=1)]


class OptimConfig(Strict):
    """AdamW with linear warmup then cosine decay."""

    lr: float = Field(2e-5, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW betas, each in [0, 1)")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="fraction of steps spent warming up")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of the peak")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global gradient norm (null: off)")


class DivergenceConfig(Strict):
    """When a finished training run counts as diverged: the stage then stops with an error and saves nothing.
    Checked once, after the last step (during training the loop stops at the first non-finite loss or
    gradient, and after it non-finite weights always stop the stage). null turns a check off."""

    max_loss_rise: float | None = Field(
        0.5, gt=0, description="stop when the mean training loss of the last 5 steps is above that of the "
        "first 5 by more than this fraction of it (0.5: 50% worse at the end than at the start; runs under 10 "
        "steps compare their halves, a 1-step run is not checked). Not read by PPO, whose loss need not fall",
    )
    max_weight_growth: float | None = Field(
        10.0, gt=1, description="stop when the norm of all the trained module's weights grew more than this "
        "factor from the start of the stage (a learning rate far too high: the weights blow up while the loss "
        "can stay flat, e.g. a reward model stuck at loss ln 2). The default round's stages grow 1.0-2.0x",
    )


class TrainConfig(Strict):
    """The training loop: batch geometry, length, precision, checkpoints and logging."""

    epochs: float = Field(1.0, gt=0, description="passes over the data (fractions allowed); not used when max_steps is set")
    max_steps: int | None = Field(
        None, gt=0,
        description="train exactly this many optimizer steps, overriding epochs (as HF TrainingArguments does): "
        "more steps than epochs gives start further passes over the data, fewer stop early; the stage log says "
        "so and the epochs_trained metric counts the passes",
    )
    batch_size: int = Field(8, gt=0, description="examples per micro-batch per process")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step per process")
    max_length: int = Field(1024, gt=0, description="truncate sequences to this many tokens")
    group_by_length: bool = Field(
        True, description="reward model and DPO: micro-batches of records of similar length (HF's "
        "group_by_length: the epoch's order cut into megabatches of 50 micro-batches, each sorted by length, "
        "then the micro-batches shuffled), so little of each padded batch is padding; false: micro-batches "
        "in the shuffled order. Other stages pack by tokens and do not read it",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="autocast precision")
    save_every: int = Field(0, ge=0, description="checkpoint (save_state) every N steps; 0: only at the end")
    keep_checkpoints: int = Field(2, gt=0, description="how many recent checkpoints to keep")
    snapshot_every: int = Field(
        0, ge=0, description="also write the policy as an HF folder snapshots/step_N every N steps (PPO: "
        "iterations) to evaluate along the run (evaluate's snapshots: true); 0: none. Policy stages only",
    )
    log_every: int = Field(1, gt=0, description="write metrics every N steps")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="metric sinks besides metrics.jsonl"
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimizer and schedule")
    divergence: DivergenceConfig | None = Field(
        default_factory=DivergenceConfig, description="when a finished run counts as diverged, so the stage "
        "stops and saves nothing (null: both checks off; the check for non-finite weights stays)",
    )


class LaunchConfig(Strict):
    """How a stage's process is started."""

    num_processes: int = Field(1, gt=0, description=">1 runs the stage under accelerate launch")
    accelerate_config: str | None = Field(None, description="an accelerate config YAML (ddp, fsdp, zero)")
