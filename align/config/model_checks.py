"""Checks of the models a recipe names against each other, before any work (JSON files only, no torch, no
weights read):

- **one tokenizer**: a model that reads the policy's token ids shares the policy's tokenizer: DPO's and
  PPO's ``reference``, the evaluation's ``reference`` (KL), PPO's value model (``value_model``, or the reward
  model it starts from by default). Each side is followed through ``from:`` to where its tokenizer comes
  from (a ``tokenizer:``, a built-in tokenizer, a folder; round 1's choice of a ``from:`` list); two folders
  are compared by their ``tokenizer.json`` / ``vocab.json`` vocabulary (size and tokens) and their end token,
  two built-in tokenizers by name. A hub id, a GGUF file, or a built-in tokenizer against a folder is not
  compared (nothing local to read);
- **the right kind of model**: a local folder given where a reward model is read (``reward:``, the
  evaluation's ``reward_models``) is a sequence-classification checkpoint with one output, and one given
  where a policy is read is not (``architectures`` in its ``config.json``);
- **model averaging**: every local checkpoint is a complete safetensors folder, the models are all policies
  or all reward models, and their ``config.json`` agree apart from bookkeeping keys (one architecture and
  size), as :mod:`align.stages.model_average` requires.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path

from align.config.base import Artifact, StageBase
from align.config.file_checks import check_model_folder, weight_files
from align.config.model_average import BOOKKEEPING_KEYS, ModelAverageStage, checkpoint_kind
from align.config.specs import PREV, as_refs

BUILTIN_MODEL = "builtin:tiny"
BUILTIN_MODEL_TOKENIZER = "builtin:bytes"  # what builtin:tiny reads without a tokenizer: (align.models.loading)


def check_models(stages: list[StageBase], produced: Mapping[str, frozenset[Artifact]]) -> list[str]:
    """Every problem of the models of ``stages`` with each other, one line each."""
    by_name = {s.name: s for s in stages}
    problems: list[str] = []
    for stage in stages:
        at = f"stages[{stage.name}]"
        problems += _roles(at, stage)
        problems += _shared_tokenizer(at, stage, by_name)
        if isinstance(stage, ModelAverageStage):
            problems += _model_average(at, stage, produced)
    return problems


# -- the kind of model in a folder ---------------------------------------------------------------------


def _config(folder: Path) -> dict | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def folder_role(folder: Path) -> str | None:
    """'reward model' (sequence classification with one output), 'policy' (another architecture), or None
    (no readable ``config.json`` with ``architectures``)."""
    config = _config(folder)
    architectures = config.get("architectures") if config else None
    if not architectures:
        return None
    scorer = any(str(a).endswith("ForSequenceClassification") for a in architectures)
    outputs = len(config["id2label"]) if isinstance(config.get("id2label"), dict) else config.get("num_labels", 2)
    return "reward model" if scorer and outputs == 1 else "policy"


def _roles(at: str, stage: StageBase) -> list[str]:
    problems = []
    for inp in stage.inputs():
        path = getattr(inp.spec, "path", None)
        if not isinstance(path, str) or getattr(inp.spec, "gguf_file", None):
            continue
        where = f"{at}.{inp.where}.path"
        if tuple(inp.accepts) == (Artifact.REWARD_MODEL,):
            role = "policy" if path == BUILTIN_MODEL else _local_role(path)
            if role == "policy":
                what = "the built-in causal LM" if path == BUILTIN_MODEL else architecture(Path(path))
                problems.append(f"{where}: {path} is a policy ({what}), not a reward model (a sequence-"
                                "classification checkpoint with one output, e.g. a reward_model stage's model: "
                                "use from: that stage)")
        elif tuple(inp.accepts) == (Artifact.POLICY,) and _local_role(path) == "reward model":
            problems.append(f"{where}: {path} is a reward model ({architecture(Path(path))}), not a policy "
                            "(a causal LM checkpoint)")
    return problems


def _local_role(path: str) -> str | None:
    folder = Path(path).expanduser()
    return folder_role(folder) if folder.is_dir() else None


def architecture(folder: Path) -> str:
    """The first name of the folder's ``config.json`` ``architectures`` ('?' when none)."""
    return str(((_config(folder) or {}).get("architectures") or ["?"])[0])


# -- one tokenizer -------------------------------------------------------------------------------------


def _model_of(stage: StageBase | None):
    """The spec a stage's model output comes from: its ``model``, or the first model it averages."""
    if stage is None:
        return None
    if isinstance(stage, ModelAverageStage):
        return stage.models[0]
    return getattr(stage, "model", None)


def tokenizer_source(spec, stages: Mapping[str, StageBase], depth: int = 0) -> str | Path | None:
    """Where the tokenizer of a model spec comes from: 'builtin:NAME', a local folder, a hub id, or None
    (unknown). Follows ``from:`` to the stage's own model (round 1's choice of a list: its first stage of
    the same round, else the ``path`` that backs up ``prev.`` references)."""
    tokenizer = getattr(spec, "tokenizer", None)
    if tokenizer:
        return _local(tokenizer)
    if getattr(spec, "gguf_file", None) or depth > len(stages):
        return None
    same_round = [r for r in as_refs(spec.from_stage) if not r.startswith(PREV)]
    if same_round:
        upstream = _model_of(stages.get(same_round[0]))
        return tokenizer_source(upstream, stages, depth + 1) if upstream is not None else None
    if spec.path is None:
        return None
    return BUILTIN_MODEL_TOKENIZER if spec.path == BUILTIN_MODEL else _local(spec.path)


def _local(name: str) -> str | Path:
    folder = Path(name).expanduser()
    return folder.resolve() if not name.startswith("builtin:") and folder.is_dir() else name


def _readers(stage: StageBase) -> list[tuple[str, object, str]]:
    """(field, spec, why) of every model of ``stage`` that reads the policy's token ids."""
    out = []
    if getattr(stage, "reference", None) is not None:
        out.append(("reference", stage.reference, "the reference scores the policy's token ids"))
    if not hasattr(stage, "value_model"):
        return out
    value = "the value model reads the policy's token ids"
    if stage.value_model is not None:  # PPO: the value model, or the reward model it starts from by default
        out.append(("value_model", stage.value_model, value))
    elif stage.reward.function is None:
        field = "reward.model" if stage.reward.model is not None else "reward.helpful"
        out.append((field, stage.reward.model or stage.reward.helpful,
                    value + " and starts from this reward model (value_model is not set)"))
    return out


def _shared_tokenizer(at: str, stage: StageBase, stages: Mapping[str, StageBase]) -> list[str]:
    policy = getattr(stage, "model", None)
    if policy is None or isinstance(stage, ModelAverageStage):
        return []
    mine = tokenizer_source(policy, stages)
    problems = []
    for field, spec, why in _readers(stage):
        theirs = tokenizer_source(spec, stages)
        difference = tokenizer_difference(theirs, mine)
        if difference:
            problems.append(f"{at}.{field}: its tokenizer ({theirs}) is not the policy's ({at}.model: {mine}): "
                            f"{difference}; {why}, so it must share the policy's tokenizer")
    return problems


def tokenizer_difference(a: str | Path | None, b: str | Path | None) -> str | None:
    """How two tokenizer sources differ (None: the same, or not known to differ)."""
    if a is None or b is None or a == b:
        return None
    if isinstance(a, str) and isinstance(b, str) and a.startswith("builtin:") and b.startswith("builtin:"):
        return f"{a} vs {b}"
    if not (isinstance(a, Path) and isinstance(b, Path)):
        return None
    sa, sb = _summary(a), _summary(b)
    differences = []
    if sa["vocab"] is not None and sb["vocab"] is not None and sa["vocab"] != sb["vocab"]:
        na, nb = len(sa["vocab"]), len(sb["vocab"])
        differences.append(f"a vocabulary of {na} tokens vs {nb}" if na != nb else
                           f"two vocabularies of {na} tokens that differ in their tokens or ids")
    if sa["eos"] is not None and sb["eos"] is not None and sa["eos"] != sb["eos"]:
        differences.append(f"end token {sa['eos']!r} vs {sb['eos']!r}")
    return "; ".join(differences) or None


def _summary(folder: Path) -> dict:
    files = [folder / n for n in ("tokenizer.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json")]
    return _read_summary(str(folder), tuple(f.stat().st_mtime_ns if f.is_file() else 0 for f in files))


@functools.cache
def _read_summary(folder: str, _mtimes: tuple) -> dict:
    """The vocabulary (token -> id, without added tokens: align adds some to a tokenizer without a chat
    template, and a reward model's may get a pad token) and the end token of a tokenizer folder."""
    def read(name: str) -> dict:
        try:
            data = json.loads((Path(folder) / name).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    vocab = (read("tokenizer.json").get("model") or {}).get("vocab")
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        vocab = {str(piece[0]): i for i, piece in enumerate(vocab) if isinstance(piece, list) and piece}
    vocab = vocab if isinstance(vocab, dict) and vocab else (read("vocab.json") or None)
    eos = read("tokenizer_config.json").get("eos_token") or read("special_tokens_map.json").get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return {"vocab": vocab, "eos": eos if isinstance(eos, str) else None}


# -- model averaging -----------------------------------------------------------------------------------


def _model_average(at: str, stage: ModelAverageStage, produced: Mapping[str, frozenset[Artifact]]) -> list[str]:
    problems, kinds, configs = [], [], []
    for k, ref in enumerate(stage.models):
        where = f"{at}.models[{k}]"
        if ref.from_stage is not None:
            has = produced.get(ref.from_stage, frozenset())
            kinds += [(where, kind) for kind in (Artifact.REWARD_MODEL, Artifact.POLICY) if kind in has][:1]
            continue
        found = _checkpoint_folder(f"{where}.path", ref.path)
        if found:
            problems += found
            continue
        kinds.append((where, checkpoint_kind(ref.path)))
        configs.append((where, _config(Path(ref.path).expanduser()) or {}))
    mixed = [(w, k) for w, k in kinds[1:] if k != kinds[0][1]]
    for where, kind in mixed[:1]:
        problems.append(f"{where}: a {_kind(kind)} cannot be averaged with a {_kind(kinds[0][1])} "
                        f"({kinds[0][0]}): the models must all be policies or all reward models")
    if not mixed:
        problems += [p for where, config in configs[1:] if (p := _config_difference(where, config, *configs[0]))]
    return problems


def _kind(kind: Artifact) -> str:
    return "reward model" if kind == Artifact.REWARD_MODEL else "policy"


def _checkpoint_folder(where: str, path: str) -> list[str]:
    folder = Path(path).expanduser()
    if not folder.exists():
        return [f"{where}: no such folder: {path}"]
    problems = check_model_folder(where, folder, True, None)
    if not problems and not weight_files(folder):
        problems.append(f"{where}: {path} has no *.safetensors weights; only safetensors checkpoints can be "
                        "averaged (save_pretrained writes them by default)")
    return problems


def _config_difference(where: str, config: dict, first_where: str, first: dict) -> str | None:
    for key in sorted((set(config) | set(first)) - BOOKKEEPING_KEYS):
        mine, theirs = (repr(c[key]) if key in c else "absent" for c in (config, first))
        if mine != theirs:
            return (f"{where}.path: config.json '{key}' is {mine}, {first_where}'s is {theirs}: only models of "
                    "one architecture and size can be averaged")
    return None
