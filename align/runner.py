"""Run a recipe: stages in order, each in ``runs/<name>/round_<k>/<stage>/``, each in a process of its own.

The runner only orchestrates; it never imports torch. Every stage runs in a child process, so no global
state (accelerate's, torch's, a model's memory) leaks from one stage into the next:

- one process: forked from a fork server that has imported torch, transformers and the stage modules once
  (a fresh process per stage for milliseconds, not seconds of imports); it ends the moment the runner
  does, so a killed run never leaves a stage training on;
- ``launch.num_processes > 1``: ``torchrun`` (or ``accelerate launch`` with the stage's config) of
  ``python -m align.runner``.

A stage whose ``result.json`` carries the same fingerprint (its config, the seed, its upstream stages'
fingerprints and the content of its input files) is skipped; a stage that was interrupted resumes from its
latest checkpoint. A finished stage whose fingerprint differs is rebuilt beside its folder (``NAME.next``)
and swapped in only when complete, so a rerun that fails or is killed loses no finished result. After a
stage ends, every artifact its kind declares must exist, or the stage fails. One ``align run`` at a time
holds a run folder (:mod:`align.run_lock`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

from align.config.checks import stage_outputs
from align.config.recipe import Recipe, dump_recipe, load_recipe
from align.fingerprint import fingerprint
from align.io_atomic import write_text_atomic
from align.run_folders import (
    check_made_by_align,
    check_run_folder,
    drop_stale_rebuild,
    mark_run_folder,
    settle_swap,
    swap,
    work_dir,
)
from align.runtime import (
    REPORT_BUG,
    StageContext,
    StageFailed,
    StageInputError,
    StageResult,
    StageStopped,
    read_result,
    write_result,
)


def stage_module(kind: str) -> ModuleType:
    """The module that runs a stage kind: its ``run(stage, ctx) -> StageResult``. The one table from kind to
    code, written as plain imports (so the import linter sees the runner use them), made inside the function
    because the stage modules import torch and the runner must not."""
    if kind == "sft":
        from align.train import sft as module
    elif kind == "reward_model":
        from align.train import reward_model as module
    elif kind == "rejection_sampling":
        from align.stages import rejection_sampling as module
    elif kind == "dpo":
        from align.train import dpo as module
    elif kind == "ppo":
        from align.train import ppo as module
    elif kind == "gatt":
        from align.stages import gatt as module
    elif kind == "model_average":
        from align.stages import model_average as module
    elif kind == "evaluate":
        from align.stages import evaluation as module
    else:
        raise KeyError(f"no module runs stage kind '{kind}' (add it to align.runner.stage_module)")
    return module


# The modules of stage_module by name, for the fork server to import once without importing them here
# (a test checks that they are exactly stage_module's modules).
STAGE_MODULES = ("align.train.sft", "align.train.reward_model", "align.stages.rejection_sampling",
                 "align.train.dpo", "align.train.ppo", "align.stages.gatt", "align.stages.model_average",
                 "align.stages.evaluation")


def stage_dir(recipe: Recipe, round_: int, name: str) -> Path:
    return recipe.run_dir / f"round_{round_}" / name


def _view(per_round: dict[int, dict], round_: int) -> dict:
    """What a stage of ``round_`` can refer to: ``prev.NAME``, the latest run of NAME in an earlier round;
    ``NAME``, its run in this round, or its latest earlier run when it does not run in this round."""
    view = {}
    for r in sorted(k for k in per_round if k < round_):
        for name, value in per_round[r].items():
            view[f"prev.{name}"] = view[name] = value
    view.update(per_round.get(round_, {}))
    return view


def _schedule(recipe: Recipe):
    """(round, stage) in run order, skipping stages that do not run in a round."""
    for round_ in range(1, recipe.rounds + 1):
        for stage in recipe.stages:
            if stage.in_rounds is None or round_ in stage.in_rounds:
                yield round_, stage


# -- the stage's own process ---------------------------------------------------------------------------


def run_stage(recipe: Recipe, stage_name: str, round_: int, fp: str, work_dir: Path | None = None) -> StageResult:
    """Run one stage in this process: rebuild what earlier stages wrote from their ``result.json``, call
    the stage kind's ``run(stage, ctx)``, check its declared outputs exist and write its ``result.json``
    (the main process of a multi-process stage). Earlier stages must have finished.

    ``work_dir``: where the stage writes (default: its folder). A rerun of a finished stage builds beside
    it and is swapped in by the runner when complete; ``result.json`` names the artifacts by the paths they
    will have then."""
    t0 = time.perf_counter()
    history: dict[int, dict[str, StageResult]] = {}
    for r, earlier in _schedule(recipe):
        if (r, earlier.name) == (round_, stage_name):
            stage = earlier
            break
        _, history.setdefault(r, {})[earlier.name] = read_result(stage_dir(recipe, r, earlier.name),
                                                                   recipe.run_dir)
    else:
        raise KeyError(f"no stage '{stage_name}' in round {round_}")
    final = stage_dir(recipe, round_, stage.name)
    out = Path(work_dir) if work_dir is not None else final
    out.mkdir(parents=True, exist_ok=True)
    produced = stage_outputs(recipe.stages)
    upstream_kinds = {ref: produced.get(ref.removeprefix("prev."), frozenset()) for ref in stage.references()}
    ctx = StageContext(
        recipe=recipe, round=round_, out_dir=out, upstream=_view(history, round_),
        history={r: v for r, v in history.items() if r < round_}, outputs=stage.outputs(upstream_kinds),
    )
    result = stage_module(stage.kind).run(stage, ctx)
    if int(os.environ.get("RANK", "0")) != 0:
        return result
    missing = [f"{kind} ({rel})" for kind, rel in ctx.outputs.items() if not (out / rel).exists()]
    if missing:
        raise RuntimeError(f"the {stage.kind} stage did not write its declared output(s): {', '.join(missing)}")
    result.artifacts = {kind: str(final / rel) for kind, rel in ctx.outputs.items()}
    result.metrics = {k: float(v) for k, v in result.metrics.items() if v is not None}
    result.seconds = time.perf_counter() - t0
    write_result(out, result, fp, recipe.run_dir)
    return result


def _user_error(err: BaseException) -> bool:
    from align.config.recipe import RecipeError
    from data_schemas import DataError

    return isinstance(err, (StageInputError, StageStopped, DataError, RecipeError))


def _stage_process(recipe_file: str, stage_name: str, round_: int, fp: str, work_dir: str, env: dict, threads,
                   conn, parent_alive) -> None:
    """Target of a one-process stage's child: the environment and thread count of the parent, then
    :func:`run_stage`; reports ``None`` or ``(user_error, message)`` through ``conn``."""
    _die_with_parent(parent_alive)
    os.environ.clear()
    os.environ.update(env)
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        run_stage(load_recipe(recipe_file, contents=False), stage_name, round_, fp, Path(work_dir))
    except BaseException as err:  # noqa: BLE001 (reported to the parent, which raises)
        if not _user_error(err):
            traceback.print_exc()
            print(REPORT_BUG, file=sys.stderr)
        conn.send((_user_error(err), f"{type(err).__name__}: {err}"))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    conn.send(None)


def _die_with_parent(parent_alive) -> None:
    """End this process the moment the runner that started it dies (``kill -9`` included): the runner
    holds the only write end of ``parent_alive``, so a read returns EOF exactly then. Without this a
    killed run would leave its stage training on, writing checkpoints, beside the rerun."""
    import threading

    def watch():
        try:
            parent_alive.recv_bytes()
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="align-parent-watch", daemon=True).start()


_FORKSERVER = None


def _fork_context():
    """A fork server that imports the heavy modules once (not torch's thread pools: it runs nothing)."""
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        modules = ["torch", "transformers", "accelerate", "align.runner",
                   # imported lazily on first use, about 3.5 s a stage if each stage paid for them
                   "transformers.models.llama.modeling_llama", "transformers.models.auto.modeling_auto",
                   "accelerate.utils", "peft", "safetensors.torch", "torch.utils.tensorboard"]
        _FORKSERVER.set_forkserver_preload(modules + list(STAGE_MODULES))
    return _FORKSERVER


def _run_child(recipe_file: Path, stage, round_: int, fp: str, work_dir: Path) -> None:
    if stage.launch.num_processes > 1:
        _launch_children(recipe_file, stage, round_, fp, work_dir)
        return
    threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    mp = _fork_context()
    receive, send = mp.Pipe(duplex=False)
    alive_read, alive_write = mp.Pipe(duplex=False)  # never written: closes when this process ends
    proc = mp.Process(target=_stage_process, name=f"align-{stage.name}",
                      args=(str(recipe_file), stage.name, round_, fp, str(work_dir), dict(os.environ), threads,
                            send, alive_read))
    proc.start()
    send.close()
    alive_read.close()
    try:
        outcome = receive.recv()
    except EOFError:
        outcome = (False, "the stage's process ended without a result")
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.terminate()
            proc.join()
        alive_write.close()
    if outcome is not None:
        user_error, message = outcome
        if proc.exitcode and proc.exitcode < 0:
            message += f" (killed by signal {-proc.exitcode})"
        raise StageFailed(stage.name, round_, message, user_error)


def _end_with_runner() -> None:
    """In a launcher child, before exec: the kernel sends it SIGTERM when the runner dies (Linux), and
    torchrun / accelerate launch stop their workers on SIGTERM. So a killed run leaves no multi-process
    stage training beside its rerun, as for one-process stages (:func:`_die_with_parent`)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _launch_children(recipe_file: Path, stage, round_: int, fp: str, work_dir: Path) -> None:
    n = stage.launch.num_processes
    entry = ["-m", "align.runner", "--recipe", str(recipe_file), "--stage", stage.name, "--round", str(round_),
             "--fingerprint", fp, "--work-dir", str(work_dir), "--processes", str(n)]
    if stage.launch.accelerate_config:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               stage.launch.accelerate_config, "--num_processes", str(n), *entry]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), *entry]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_end_with_runner)
    if done.returncode != 0:
        raise StageFailed(stage.name, round_, f"{n} processes: exit code {done.returncode} (see above)",
                          user_error=done.returncode == 2)


# -- the orchestrator ----------------------------------------------------------------------------------


def run_recipe(recipe: Recipe, log=print) -> list[dict]:
    """Run every stage of every round, each in its own process; returns the report records.

    Holds the run folder's lock throughout (a second run into the same folder stops at once). A stage whose
    finished result is of another configuration is rebuilt beside it (``NAME.next``) and swapped in only
    when complete: a failed or killed rerun loses nothing that was finished. A run folder that holds files
    align did not write is refused before anything is written (:func:`align.run_folders.check_run_folder`)."""
    from align.run_lock import run_folder_lock

    run_dir = recipe.run_dir
    check_run_folder(run_dir)  # before the lock, which writes its files into the folder
    with run_folder_lock(run_dir):
        return _run_locked(recipe, run_dir, log)


def _run_locked(recipe: Recipe, run_dir: Path, log) -> list[dict]:
    resolved = run_dir / "resolved.yaml"
    running = run_dir / "resolved.running.yaml"  # what this run's stages read; becomes resolved.yaml at the end
    for round_, stage in _schedule(recipe):  # before any work: no stage may write where align did not,
        check_made_by_align(stage_dir(recipe, round_, stage.name))
        read_result(stage_dir(recipe, round_, stage.name))  # and a damaged result.json stops the run
    mark_run_folder(run_dir)
    write_text_atomic(running, dump_recipe(recipe))
    records, worked = [], False
    all_fps: dict[int, dict[str, str]] = {}
    for round_, stage in _schedule(recipe):
        fps = all_fps.setdefault(round_, {})
        out = stage_dir(recipe, round_, stage.name)
        settle_swap(out)
        fp = fingerprint(recipe, stage, round_, _view(all_fps, round_))
        old_fp, result = read_result(out, run_dir)
        t0 = time.perf_counter()
        skipped = old_fp == fp
        if skipped:
            stale = drop_stale_rebuild(out)
            log(f"[round {round_}] {stage.name}: up to date, skipped"
                + (f" (removed {out.name}.next, an unfinished rebuild of another configuration)" if stale else ""))
        else:
            work = work_dir(out, fp, stage.kind)
            beside = " (beside the finished result of another configuration, swapped in when done)" \
                if work != out else ""
            log(f"[round {round_}] {stage.name} ({stage.kind}): running{beside}")
            _run_child(running, stage, round_, fp, work)
            if read_result(work)[0] != fp:
                raise StageFailed(stage.name, round_, "it ended without writing result.json")
            swap(work, out)
            _, result = read_result(out, run_dir)
            worked = True
        fps[stage.name] = fp
        records.append({
            "round": round_, "stage": stage.name, "kind": stage.kind, "metrics": result.metrics,
            "artifacts": {str(k): v for k, v in result.artifacts.items()}, "skipped": skipped,
            "seconds": round(time.perf_counter() - t0, 1), "stage_seconds": result.seconds,
        })
    if not worked:
        log("nothing to do: every stage is up to date")
    running.replace(resolved)
    write_report(run_dir, recipe, records)
    return records


def write_report(run_dir: Path, recipe: Recipe, records: list[dict]) -> None:
    from align.report import write_report as write

    write(run_dir, recipe.name, records, write_text_atomic)


def _child_main(argv=None) -> None:
    """Entry of a multi-process stage's processes (``python -m align.runner``, under torchrun)."""
    p = argparse.ArgumentParser(description="run one stage of a resolved recipe (used by align run)")
    p.add_argument("--recipe", required=True, help="the run's resolved.yaml")
    p.add_argument("--stage", required=True, help="the stage's name")
    p.add_argument("--round", type=int, default=1, help="the round (1-based)")
    p.add_argument("--fingerprint", required=True, help="written into result.json")
    p.add_argument("--work-dir", help="where the stage writes (default: its folder in the run)")
    p.add_argument("--processes", type=int, default=None, help="how many processes the launcher must start")
    args = p.parse_args(argv)
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if args.processes is not None and world != args.processes:
            raise StageInputError(
                f"the launcher started {world} process(es), the stage asked for {args.processes} "
                "(launch.num_processes); accelerate runs a CPU config (use_cpu, MULTI_CPU) as one process "
                "unless MPI is set up: on CPUs leave launch.accelerate_config out (align then uses torchrun)"
            )
        run_stage(load_recipe(args.recipe, contents=False), args.stage, args.round, args.fingerprint,
                  Path(args.work_dir) if args.work_dir else None)
    except (StageInputError, StageStopped) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    _close_process_group()


def _close_process_group() -> None:
    """Tear the process group down before the interpreter exits: left to exit-time destructors, gloo's
    threads can abort a finished process ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    _child_main()
