"""Evaluation: generate on held-out prompts and report the evaluators' metrics (by default the built-in
world's gold metrics), reward-model scores and KL.

``kl_to_reference`` (:func:`align.models.kl.kl_to_reference`) is the per-token KL(policy || reference) over
the full next-token distributions, summed over each response's tokens and averaged over prompts, along the
policy's own (evaluation) responses: deterministic for greedy decoding and never negative.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from align.checksums import verify_model_folder
from align.config.base import PROMPT_SOURCES, Artifact
from align.config.evaluation import EvaluationStage, RetentionEval
from align.config.sampling import SamplingParams
from align.config.specs import ModelSpec, as_refs
from align.data.sources import load_prompts
from align.evaluators import Evaluator, evaluate_all, first_scores, load_evaluators
from align.generation import make_generator
from align.models.kl import kl_to_reference
from align.models.loading import load_causal_lm, load_tokenizer
from align.runtime import StageContext, StageResult
from data_schemas import Message, PromptRecord, ScoredSample, write_jsonl


def _load(spec: ModelSpec, path: str, seed: int):
    tokenizer = load_tokenizer(spec, path)
    model = load_causal_lm(spec.model_copy(update={"lora": None, "gradient_checkpointing": False}),
                           path, tokenizer, seed=seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def evaluate(policy_path: str, prompts: list[PromptRecord], *, spec: ModelSpec | None = None,
             reference_path: str | None = None, reference_spec: ModelSpec | None = None,
             reward_models: dict[str, str] | None = None, sampling: SamplingParams | None = None,
             backend: str = "hf", evaluators: Sequence[Evaluator] = (), seed: int = 0,
             retention: RetentionEval | None = None, out_dir: str | Path | None = None) -> tuple[dict, list[str]]:
    """-> (metrics, responses). Runs one model at a time, so peak memory is one model.

    ``evaluators`` (:mod:`align.evaluators`) judge the answers; ``retention``: also run the multi-turn
    instruction-retention evaluation (:func:`align.stages.retention.evaluate_retention`; its files go to
    ``out_dir``)."""
    spec = spec or ModelSpec(path=policy_path)
    sampling = sampling or SamplingParams(temperature=0.0, max_new_tokens=64, batch_size=32)
    convs = [_as_dicts(p.prompt) for p in prompts]
    # step 1: generate
    model, tokenizer = _load(spec, policy_path, seed)
    generator = make_generator("hf", model=model, tokenizer=tokenizer) if backend == "hf" \
        else make_generator("vllm", policy_path, tokenizer=tokenizer)
    samples = [s[0] for s in generator.sample(convs, 1, sampling)]
    responses, finished = [s.text for s in samples], [s.finish_reason == "stop" for s in samples]
    metrics: dict[str, float] = {}
    # step 2: the evaluators
    metrics.update(evaluate_all(evaluators, convs, responses))
    metrics["response_length"] = sum(len(r) for r in responses) / max(len(responses), 1)
    metrics["empty_answers"] = float(sum(not r.strip() for r in responses))
    # step 2b: multi-turn instruction retention (built-in world dialogues, whatever the prompts)
    if retention is not None:
        from align.stages.retention import evaluate_retention

        metrics.update(evaluate_retention(generator, retention, model=model, tokenizer=tokenizer,
                                          batch_size=sampling.batch_size, out_dir=out_dir))
    # step 3: KL to the reference
    if reference_path is not None and _same_model(policy_path, spec, reference_path, reference_spec):
        metrics["kl_to_reference"] = 0.0  # the policy is its own reference (e.g. the start's own evaluation)
    elif reference_path is not None:
        ref_model, _ = _load(reference_spec or ModelSpec(path=reference_path), reference_path, seed)
        metrics["kl_to_reference"] = kl_to_reference(model, ref_model, tokenizer, convs, responses, finished)
        del ref_model
    del model, generator
    # step 4: reward models
    if reward_models:
        from rewards.scoring import RewardScorer

        for name, path in reward_models.items():
            verify_model_folder(path)
            scorer = RewardScorer.from_pretrained(path)
            metrics[f"reward/{name}"] = sum(scorer.score(convs, responses)) / max(len(convs), 1)
            del scorer
    return metrics, responses


def _same_model(path: str, spec: ModelSpec, ref_path: str, ref_spec: ModelSpec | None) -> bool:
    """Whether the reference loads the very weights the policy does (same files, same loading settings)."""
    loaded = {"lora", "gradient_checkpointing"}  # evaluation loads both without an adapter to train
    return ref_spec is not None and Path(path).expanduser().resolve() == Path(ref_path).expanduser().resolve() \
        and spec.model_dump(exclude=loaded) == ref_spec.model_dump(exclude=loaded)


def run(stage: EvaluationStage, ctx: StageContext) -> StageResult:
    """1. prompts  2. generate, judge, KL, reward scores (see ``evaluate``)  3. write answers + metrics."""
    # step 1
    prompts = load_prompts(stage.prompts, ctx.data_paths(stage.prompts, PROMPT_SOURCES), seed=0)
    evaluators = load_evaluators(stage.evaluators)
    # step 2
    reference = ctx.model_path(stage.reference) if stage.reference is not None else None
    metrics, responses = evaluate(
        ctx.model_path(stage.model), prompts, spec=stage.model, reference_path=reference,
        reference_spec=stage.reference,
        reward_models={n: ctx.model_path(s) for n, s in stage.reward_models.items()},
        sampling=stage.sampling, backend=stage.backend, evaluators=evaluators, seed=ctx.seed,
        retention=stage.retention, out_dir=ctx.out_dir,
    )
    # step 3
    write_jsonl(ctx.output(Artifact.SAMPLES), answers(prompts, responses, evaluators))
    (Path(ctx.out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    # step 4
    if stage.snapshots:
        metrics["snapshots"] = float(_evaluate_snapshots(stage, ctx, prompts, reference, metrics, evaluators))
    return StageResult(metrics=metrics)


def _evaluate_snapshots(stage: EvaluationStage, ctx: StageContext, prompts, reference, final: dict,
                        evaluators: Sequence[Evaluator]) -> int:
    """Evaluate every snapshot of the policy's stage like the policy itself (no reward models, no
    retention) -> how many; writes ``snapshots.jsonl``: one row per snapshot by step, then the final
    policy's (its step: the stage's ``steps`` or ``iterations`` when it reports them)."""
    from align.io_atomic import write_text_atomic
    from align.models.snapshots import list_snapshots

    rows = []
    for step, folder in list_snapshots(ctx.model_path(stage.model)):
        m, _ = evaluate(str(folder), prompts, spec=stage.model, reference_path=reference,
                        reference_spec=stage.reference, sampling=stage.sampling, backend=stage.backend,
                        evaluators=evaluators, seed=ctx.seed)
        rows.append({"step": step, **m})
    upstream = next((ctx.upstream[r] for r in as_refs(stage.model.from_stage) if r in ctx.upstream), None)
    done = (upstream.metrics.get("steps") or upstream.metrics.get("iterations")) if upstream else None
    not_measured = ("reward/", "retention/")  # the snapshots are not scored by RMs nor in dialogues
    rows.append({"step": done, **{k: v for k, v in final.items() if not k.startswith(not_measured)}})
    write_text_atomic(Path(ctx.out_dir) / "snapshots.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows) - 1


def answers(prompts: list[PromptRecord], responses: list[str],
            evaluators: Sequence[Evaluator] = ()) -> list[ScoredSample]:
    """The answers as scored samples; ``score`` is the first evaluator's that scores these prompts (the
    world's gold score on world prompts; :func:`align.evaluators.first_scores`), else none. Blank answers
    are left out (a sample's response is never empty; ``empty_answers`` counts them)."""
    kept = [(p, r) for p, r in zip(prompts, responses, strict=True) if r.strip()]
    scores = first_scores(evaluators, [p.prompt for p, _ in kept], [r for _, r in kept]) or [None] * len(kept)
    return [ScoredSample(prompt=p.prompt, response=Message(role="assistant", content=r), score=s)
            for (p, r), s in zip(kept, scores, strict=True)]


def _as_dicts(messages) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]
