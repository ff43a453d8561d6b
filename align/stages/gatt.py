"""Ghost Attention (Llama 2 sec. 3.3): synthesise multi-turn SFT data that keeps a first-turn instruction.

1. plan: each source chat's user turns and an instruction (:func:`align.data.gatt.plan_dialogues`);
2. answer turn by turn with the current model, the instruction attached to every user message
   (:func:`align.generation.dialogue.roll_out`; ``k > 1``: the best of k by the reward, per turn);
3. write SFT records with the instruction in the first turn only and ``weight: 0`` on the earlier answers
   (:func:`align.data.gatt.gatt_record`); the sft stage trains on them.

Resumable and shardable like rejection sampling: dialogues are cut into fixed batches, batch b is made by
process ``b % world`` with a seed derived from b and appended to a store when done, so a killed run keeps
every finished batch and the result does not depend on the number of processes.

Simplification: for best-of-k, the safety tag of a chat turn is unknown, so the Llama 2 combined reward
uses the safety score only by its threshold rule.
"""

from __future__ import annotations

import gc
import json
import time
import warnings

from align.config.base import Artifact
from align.config.gatt import GattStage
from align.data.gatt import as_seen, attach, gatt_record, plan_dialogues
from align.data.sources import load_sft
from align.evaluators import evaluate_turns, load_evaluators
from align.generation import make_generator, policy_generator
from align.generation.dialogue import roll_out
from align.io_atomic import append_line, read_json_lines
from align.runtime import StageContext, StageInputError, StageResult
from data_schemas import Message, SFTRecord, write_jsonl


def read_store(out_dir, batches: list[list[int]], turns: list[int], warn: bool = True) -> dict[int, list[list[str]]]:
    """batch index -> the answers of its dialogues; records cut short or for other work count as missing."""
    done = {}
    for path in sorted(out_dir.glob("store.rank*.jsonl")):
        for n, row, bad in read_json_lines(path):
            if bad is None:
                b = row.get("batch") if isinstance(row, dict) else None
                answers = row.get("answers") if isinstance(row, dict) else None
                ok = (isinstance(b, int) and 0 <= b < len(batches) and row.get("dialogues") == batches[b]
                      and isinstance(answers, list)
                      and [len(a) for a in answers] == [turns[i] for i in batches[b]])
                bad = None if ok else "for other dialogues or incomplete"
            if bad is not None:
                if warn:
                    warnings.warn(f"{path}:{n}: store record {bad}; its batch is made again", stacklevel=2)
                continue
            done[b] = answers
    return done


def _make_missing(stage: GattStage, ctx: StageContext, plans, batches, accelerator) -> int:
    from tqdm.auto import tqdm

    turns = [len(p.users) for p in plans]
    done = read_store(ctx.out_dir, batches, turns, warn=accelerator.is_main_process)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = [b for b in range(len(batches)) if b % world == rank and b not in done]
    if not mine:
        return 0
    generator = policy_generator(stage.model, ctx.model_path(stage.model), stage.backend, ctx.seed,
                                 accelerator.device, make=make_generator)
    choose = _best_of(stage, ctx) if stage.k > 1 else None
    store = ctx.out_dir / f"store.rank{rank}.jsonl"
    bar = tqdm(total=len(mine), desc=f"{stage.name} dialogues", disable=not accelerator.is_main_process)
    answered = 0
    for b in mine:
        group = [plans[i] for i in batches[b]]
        params = stage.sampling.model_copy(update={"seed": stage.sampling.seed + 7919 * b + 104729 * ctx.round})
        answers = roll_out(
            generator, [[] for _ in group], [p.users for p in group], params,
            decorate_user=lambda i, t, text, group=group: attach(group[i].instruction, text),
            k=stage.k, choose=choose,
        )
        append_line(store, json.dumps({"batch": b, "dialogues": batches[b], "answers": answers}))
        answered += sum(len(a) for a in answers)
        bar.update(1)
    bar.close()
    generator.close()
    del generator
    gc.collect()
    return answered


def _best_of(stage: GattStage, ctx: StageContext):
    from align.models.reward_fn import build_reward

    reward = build_reward(stage.reward, ctx.model_path)

    def choose(prompts: list[list[Message]], candidates: list[list[str]]) -> list[int]:
        flat_prompts = [p for p, cands in zip(prompts, candidates, strict=True) for _ in cands]
        flat = [c for cands in candidates for c in cands]
        scores = reward(flat_prompts, flat, [False] * len(flat)).tolist()
        picks, pos = [], 0
        for cands in candidates:
            mine = scores[pos : pos + len(cands)]
            picks.append(max(range(len(cands)), key=mine.__getitem__))
            pos += len(cands)
        return picks

    return choose


def run(stage: GattStage, ctx: StageContext) -> StageResult:
    """1. plan the dialogues  2. answer them turn by turn (resumable, sharded)  3. write the SFT records
    4. metrics, with the stage's evaluators' (each answer judged on what the model saw)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not _cuda())
    # step 1
    records, held = load_sft(stage.dialogues, ctx.data_paths(stage.dialogues, (Artifact.SFT_RECORDS,)), ctx.seed)
    plans = plan_dialogues(records + held, stage.instructions, stage.min_turns, stage.max_turns, ctx.seed)
    if not plans:
        raise StageInputError(f"stage '{stage.name}': no dialogue has {stage.min_turns} or more user turns")
    evaluators = load_evaluators(stage.evaluators)
    size = stage.sampling.batch_size
    batches = [list(range(i, min(i + size, len(plans)))) for i in range(0, len(plans), size)]
    # step 2
    t0 = time.perf_counter()
    answered = _make_missing(stage, ctx, plans, batches, accelerator)
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return StageResult()
    answers = gather_answers(stage, ctx, plans, batches)
    # step 3
    out, counts = build_records(stage, ctx, plans, answers)
    write_jsonl(ctx.output(Artifact.SFT_RECORDS), out)
    # step 4
    metrics = {"dialogues": len(plans), "records": len(out), **counts,
               "turns_mean": sum(len(p.users) for p in plans) / len(plans), "answers_generated": answered}
    if answered:
        metrics["answers_per_s"] = answered / max(seconds, 1e-9)
    if evaluators:
        seen, texts, _ = _turns(plans, answers)
        metrics.update(evaluate_turns(evaluators, seen, texts))
    return StageResult(metrics=metrics)


def gather_answers(stage: GattStage, ctx: StageContext, plans, batches) -> list[list[str]]:
    """Every dialogue's answers from the store (every batch must be there)."""
    store = read_store(ctx.out_dir, batches, [len(p.users) for p in plans], warn=False)
    missing = [b for b in range(len(batches)) if b not in store]
    if missing:
        raise RuntimeError(f"stage '{stage.name}': batches {missing} missing from the store after generation")
    answers: list[list[str]] = [[] for _ in plans]
    for b, batch_answers in store.items():
        for i, a in zip(batches[b], batch_answers, strict=True):
            answers[i] = a
    return answers


def build_records(stage: GattStage, ctx: StageContext, plans, answers) -> tuple[list[SFTRecord], dict[str, int]]:
    """The training records and what was left out. A dialogue with an empty answer cannot be a training
    record (the schema refuses empty turns); with min_score, one whose last answer (loss_on passing: every
    answer) scores below it is left out."""
    scores = _answer_scores(stage, ctx, plans, answers) if stage.min_score is not None else None
    out, empty, low, trained = [], 0, 0, 0
    for i, (plan, a) in enumerate(zip(plans, answers, strict=True)):
        if not all(x.strip() for x in a):
            empty += 1
            continue
        passing = None if scores is None else [x >= stage.min_score for x in scores[i]]
        if passing is not None and not (any(passing) if stage.loss_on == "passing" else passing[-1]):
            low += 1
            continue
        trained += sum(passing) if stage.loss_on == "passing" else len(a) if stage.loss_on == "all" else 1
        out.append(gatt_record(plan, a, stage.placement, stage.loss_on, passing=passing, source=f"gatt:{stage.name}",
                               meta={"index": i, "round": ctx.round}))
    if not out:
        raise StageInputError(f"stage '{stage.name}': no dialogue left ({empty} with an empty answer, {low} whose "
                              "last answer scored below min_score); check the model and min_score")
    return out, {"dropped_empty_answer": empty, "dropped_below_min_score": low, "trained_answers": trained}


def _turns(plans, answers) -> tuple[list[list[dict]], list[str], list[int]]:
    """Every answer with the messages the model saw when it wrote it (the instruction before every user
    message), and the index of its dialogue."""
    prompts, texts, owner = [], [], []
    for i, (plan, dialogue) in enumerate(zip(plans, answers, strict=True)):
        for seen, answer in as_seen(plan, dialogue):
            prompts.append(seen)
            texts.append(answer)
            owner.append(i)
    return prompts, texts, owner


def _answer_scores(stage: GattStage, ctx: StageContext, plans, answers) -> list[list[float]]:
    """The reward of every answer, each on the dialogue as the model saw it when answering."""
    from align.models.reward_fn import build_reward

    prompts, texts, owner = _turns(plans, answers)
    flat = build_reward(stage.reward, ctx.model_path)(prompts, texts, [False] * len(texts)).tolist() if texts else []
    scores: list[list[float]] = [[] for _ in plans]
    for i, x in zip(owner, flat, strict=True):
        scores[i].append(x)
    return scores


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
