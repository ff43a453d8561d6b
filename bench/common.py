"""Helpers shared by the benches (SFT, reward model, DPO, rejection sampling, ...).

A bench runs the same work through align and through a peer library (TRL) and prints a few human lines,
then ONE JSON object as its last line. Each side runs in a fresh child process (the bench script
re-invoked with ``--side NAME``), so that peak memory is the child's own and neither side inherits the
other's allocator state, threads or imports; the parent reads the child's last stdout line as JSON.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset just before the timed section); on CPU
the child's peak resident set size (``ru_maxrss``), plus the growth over the RSS just before the timed
section (``delta``: what training itself added, without the imports and data of each library).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------- output


def emit_json(obj: dict) -> None:
    """Print ``obj`` as one JSON line (the bench's machine-readable result) and flush."""
    print(json.dumps(obj, sort_keys=False), flush=True)


def last_json_line(text: str) -> dict:
    """The last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON line in the output")


def rounded(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def ratio(ours: float, peer: float) -> float | None:
    return None if not peer else ours / peer


# ---------------------------------------------------------------- device and memory


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return max_rss_mb()


def max_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@dataclass
class Measurement:
    """Wall seconds of a timed section and the memory it needed (filled when the section ends)."""

    device: str
    seconds: float = 0.0
    peak_mb: float = 0.0  # CUDA: max allocated in the section; CPU: the process's peak RSS
    delta_mb: float = 0.0  # CUDA: peak minus allocated at the start; CPU: peak RSS minus RSS at the start
    kind: str = ""  # how peak_mb was measured

    def as_dict(self) -> dict:
        return {"section_s": self.seconds, "peak_mb": round(self.peak_mb, 1),
                "delta_mb": round(self.delta_mb, 1), "memory": self.kind}


@contextmanager
def measure(device: str):
    """``with measure(device) as m: ...`` times the block (synchronising CUDA) and records its memory."""
    m = Measurement(device)
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mb = torch.cuda.memory_allocated() / 2**20
        m.kind = "cuda max_memory_allocated"
    else:
        start_mb = rss_mb()
        m.kind = "process peak RSS (ru_maxrss)"
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        sync(device)
        m.seconds = time.perf_counter() - t0
        if device.startswith("cuda"):
            import torch

            m.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            m.peak_mb = max_rss_mb()
        m.delta_mb = max(0.0, m.peak_mb - start_mb)


class StepClock:
    """Timestamps of a training loop: ``start()`` before it, ``mark(**counts)`` after every optimizer
    step with running totals (examples, tokens, ...). ``rate(key)`` is key-per-second over all steps;
    ``rate(key, skip=1)`` leaves out the first step (warm-up: lazy init, first allocations), which is the
    steady-state throughput a long run sees."""

    def __init__(self, device: str):
        self.device = device
        self.marks: list[tuple[float, dict]] = []

    def start(self, **counts) -> None:
        sync(self.device)
        self.marks = [(time.perf_counter(), dict(counts))]

    def mark(self, **counts) -> None:
        sync(self.device)
        self.marks.append((time.perf_counter(), dict(counts)))

    @property
    def steps(self) -> int:
        return len(self.marks) - 1

    def seconds(self, skip: int = 0) -> float:
        skip = min(skip, self.steps - 1) if self.steps > 1 else 0
        return self.marks[-1][0] - self.marks[skip][0]

    def count(self, key: str, skip: int = 0) -> float:
        skip = min(skip, self.steps - 1) if self.steps > 1 else 0
        return self.marks[-1][1].get(key, 0) - self.marks[skip][1].get(key, 0)

    def rate(self, key: str, skip: int = 0) -> float:
        return self.count(key, skip) / max(self.seconds(skip), 1e-12)


# ---------------------------------------------------------------- child processes


class LoopClock(StepClock):
    """StepClock of an RL loop's iterations (``episodes`` counted), with the memory: at ``start`` the
    current RSS (CUDA: allocated bytes, after resetting the peak), at every ``mark`` the peak so far."""

    def start(self, **counts) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mb, self.kind = torch.cuda.memory_allocated() / 2**20, "cuda max_memory_allocated"
        else:
            self.start_mb, self.kind = rss_mb(), "process peak RSS (ru_maxrss)"
        self.peak_mb = self.start_mb
        super().start(**counts)

    def mark(self, **counts) -> None:
        super().mark(**counts)
        if self.device.startswith("cuda"):
            import torch

            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_mb = max_rss_mb()

    def result(self, side: str, warmup: int, **extra) -> dict:
        if self.steps == 0:
            raise RuntimeError(f"{side}: the iteration loop was never observed")
        skip = min(warmup, self.steps - 1)
        return {
            "side": side, "device": self.device, "iterations": self.steps, "timed_iterations": self.steps - skip,
            "episodes": self.count("episodes", skip), "seconds": self.seconds(skip),
            "episodes_per_s": self.rate("episodes", skip), "episodes_per_s_all": self.rate("episodes"),
            "iteration_seconds": [round(b[0] - a[0], 3) for a, b in zip(self.marks, self.marks[1:], strict=False)],
            "start_mb": self.start_mb, "peak_mb": self.peak_mb, "delta_mb": max(0.0, self.peak_mb - self.start_mb),
            "memory": self.kind, **extra,
        }


def run_side(script: str | Path, argv: Sequence[str], side: str, *, threads: int = 0,
             timeout: float | None = None, echo: bool = False) -> dict:
    """Run ``python script *argv --side side`` in a fresh process; return its last JSON line.

    ``threads`` > 0 pins the child's intra-op threads (OMP/MKL) before torch starts: with 1, timings on a
    machine shared with other work stay stable (no thread barrier waits on a descheduled core).
    The child's output is shown only with ``echo`` or when it fails (its tail, with the command).
    """
    cmd = [sys.executable, str(script), *argv, "--side", side]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if echo:
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-40:])
        raise RuntimeError(f"side '{side}' failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return last_json_line(proc.stdout)


# ---------------------------------------------------------------- models and data


def tiny_llama(hidden: int, layers: int, vocab: int, *, intermediate: int | None = None,
               heads: int | None = None, kv_heads: int | None = None, max_positions: int = 1024,
               tie: bool = True, seed: int = 0):
    """A randomly initialised Llama built with align's builtin-model code (``build_tiny_model``).

    Defaults follow Llama's proportions: head_dim 64, GQA with half as many KV heads, MLP width
    ~8/3 x hidden rounded up to a multiple of 64.
    """
    from align.config.specs import ModelSpec, TinyModelConfig
    from align.models.loading import build_tiny_model

    heads = heads or max(1, hidden // 64)
    kv_heads = kv_heads or max(1, heads // 2)
    intermediate = intermediate or -(-(hidden * 8 // 3) // 64) * 64
    tiny = TinyModelConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv_heads,
                           max_position_embeddings=max_positions, tie_word_embeddings=tie)
    return build_tiny_model(ModelSpec(path="builtin:tiny", tiny=tiny), vocab, seed)


def save_tiny_llama(out_dir: str | Path, hidden: int, layers: int, vocab: int = 0, seed: int = 0,
                    tokenizer: str = "builtin:bytes", **kwargs) -> tuple[Path, str]:
    """Save a tiny Llama + one of align's local tokenizers (``builtin:bytes``, or ``builtin:world``, the
    default round's) as one HF folder both sides load.

    ``vocab`` larger than the tokenizer's ids gives the model a realistic vocabulary (embedding and
    LM head of that size; the extra ids are never produced by the tokenizer, like the unused tail of a
    real vocabulary). Returns (folder, a short description of the model).
    """
    from align.data.chat import build_builtin_tokenizer

    tokenizer = build_builtin_tokenizer(tokenizer)
    vocab = max(vocab, len(tokenizer))
    model = tiny_llama(hidden, layers, vocab, seed=seed, **kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    c = model.config
    desc = (f"llama h{c.hidden_size} L{c.num_hidden_layers} mlp{c.intermediate_size} "
            f"heads{c.num_attention_heads}/{c.num_key_value_heads} vocab{c.vocab_size} "
            f"{'tied' if c.tie_word_embeddings else 'untied'} {n / 1e6:.1f}M fp32")
    return out, desc


def write_jsonl(path: str | Path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def messages_row(record) -> dict:
    """A data_schemas SFTRecord as a TRL conversational row ``{"messages": [...]}`` (system included)."""
    return {"messages": [{"role": m.role, "content": m.content} for m in record.conversation()]}


# ---------------------------------------------------------------- pinned peer versions


def align_cache() -> Path:
    """Where pinned side installs live: ``$ALIGN_TEST_CACHE`` or ``~/.cache/align-tests`` (shared by the
    tests and the benches, so each version is downloaded once)."""
    return Path(os.environ.get("ALIGN_TEST_CACHE", Path.home() / ".cache" / "align-tests"))


def pip_target(name: str, version: str, marker: str, timeout: float = 300) -> Path:
    """``pip install --no-deps --target`` of ``name==version`` into ``align_cache()/NAME-VERSION``, once.

    The folder is meant for a child process that puts it first on ``sys.path``, so the pinned version
    never clashes with the one the project itself uses; the project's environment provides the
    dependencies. ``marker``: a file inside the install (relative to the folder) that proves it is
    complete. Installs into a temporary folder renamed at the end, so a concurrent run never sees half
    an install. Raises RuntimeError when pip cannot install it (offline, unknown version)."""
    cache = align_cache()
    target = cache / f"{name}-{version}"
    if (target / marker).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"{name}-{version}.partial-{os.getpid()}"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target",
           str(partial), f"{name}=={version}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeError(f"cannot install {name}=={version}: {err}") from err
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeError(f"cannot install {name}=={version}: {done.stderr.strip()[-500:]}")
    try:
        partial.rename(target)
    except OSError:  # another run got there first
        shutil.rmtree(partial, ignore_errors=True)
    if not (target / marker).is_file():
        raise RuntimeError(f"{name}=={version} installed in {target} but {marker} is missing")
    return target
