"""Every command, not only ``align run``, refuses bad input with one ``error:`` line per problem naming the
argument, field or file, exit code 2, no traceback and nothing written: ``align eval policy``, ``align eval
reward-model``, ``align report``, ``align data``, ``align validate``, ``align run``.

Each row runs the real ``align`` script in a subprocess (about a second of imports), all rows on one shared
folder, with ``HF_HUB_OFFLINE=1`` and an empty Hugging Face cache: no row may touch the network.
(``tests/unit/test_bad_inputs.py`` holds the recipe cases of ``align run``, in process.)
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from align.cli import main
from align.runtime import REPORT_BUG

ALIGN = str(Path(sys.executable).with_name("align"))
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1}
NOT_READABLE = "unreadable.jsonl"  # mode 000 (root reads it anyway: the rows drop root's file capabilities)


def model_folder(path: Path, architecture: str, **config) -> str:
    """A folder that passes the file checks (config, complete safetensors, tokenizer): never loaded here."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": [architecture], **config}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    (path / "tokenizer.json").write_text("{}")
    return str(path)


def recipe(folder: Path, name: str, stage: dict, output_dir: str = "runs") -> str:
    stage = {"name": "s", "kind": "sft", "model": {"path": "builtin:tiny", "tiny": TINY},
             "data": {"builtin": "chat", "builtin_size": 16},
             "train": {"batch_size": 2, "max_length": 32, "max_steps": 1, "report_to": []}} | stage
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "output_dir": str(folder / output_dir), "stages": [stage]}))
    return str(path)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """One folder for every row: models, data, recipes, a damaged report and a damaged stage result."""
    ws = tmp_path_factory.mktemp("commands")
    model_folder(ws / "policy", "LlamaForCausalLM")
    model_folder(ws / "rm", "LlamaForSequenceClassification", id2label={"0": "LABEL_0"})
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(4)]
    (ws / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ws / NOT_READABLE).write_text((ws / "prefs.jsonl").read_text())
    (ws / NOT_READABLE).chmod(0)
    (ws / "a_file").write_text("not a folder\n")
    (ws / "bad.gguf").write_bytes(b"GGUF" + b"this is no model, only text after the magic\n")
    (ws / "report").mkdir()
    (ws / "report/report.json").write_text('[{"round": 1, "stage": "sft", "kind"')
    recipe(ws, "ok", {})
    recipe(ws, "unreadable", {"data": {"paths": [str(ws / NOT_READABLE)]}})
    recipe(ws, "gguf", {"model": {"path": str(ws), "gguf_file": "bad.gguf"}})
    recipe(ws, "hub", {"model": {"path": "someorg/not-downloaded"}})
    recipe(ws, "rm", {"kind": "reward_model", "data": {"paths": [str(ws / "prefs.jsonl")]},
                      "train": {"batch_size": 2, "max_length": 1, "max_steps": 1, "report_to": []}})
    stage = ws / "runs/ok/round_1/s"  # a finished stage whose result.json was cut short
    stage.mkdir(parents=True)
    (stage / "stage.json").write_text(json.dumps({"fingerprint": "f", "kind": "sft"}))
    (stage / "result.json").write_text('{"fingerprint": "f", "artifacts": {"policy": "round_')
    return ws


def row(args: str, *words: str, problems: int = 1) -> tuple[str, tuple[str, ...], int]:
    """``args`` ({ws}: the shared folder); the words stderr must hold, in order; how many problems it names."""
    return args, words, problems


CASES: dict[str, tuple[str, tuple[str, ...], int]] = {
    "eval policy: model folder missing": row("eval policy --model {ws}/runs/x/model", "--model: no such folder"),
    "eval reward-model: model folder missing": row(
        "eval reward-model --model runs/x/model --data {ws}/prefs.jsonl", "--model: no such folder: runs/x/model"),
    "eval reward-model: a policy folder": row(
        "eval reward-model --model {ws}/policy --data {ws}/prefs.jsonl", "--model", "not a reward model"),
    "eval reward-model: --max-length 0": row(
        "eval reward-model --model {ws}/rm --data {ws}/prefs.jsonl --max-length 0", "--max-length: must be at least 2"),
    "eval reward-model: --batch-size 0": row(
        "eval reward-model --model {ws}/rm --data {ws}/prefs.jsonl --batch-size 0", "--batch-size: must be at least 1"),
    "eval policy: --n 0 and --batch-size 0": row(
        "eval policy --model {ws}/policy --n 0 --batch-size 0", "--n: must be at least 1", "--batch-size", problems=2),
    "eval policy: a hub id, offline and not cached": row(
        "eval policy --model someorg/not-downloaded", "--model: 'someorg/not-downloaded'", "HF_HUB_OFFLINE"),
    "eval policy: unreadable prompts": row(
        f"eval policy --model {{ws}}/policy --prompts {{ws}}/{NOT_READABLE}", "--prompts", "Permission denied"),
    "eval reward-model: unreadable data": row(
        f"eval reward-model --model {{ws}}/rm --data {{ws}}/{NOT_READABLE}", "--data", "Permission denied"),
    "report: malformed report.json": row("report {ws}/report", "report.json: cannot be read"),
    "data world: --out under a file": row("data world --out {ws}/a_file/world --size small", "--out", "a_file is a file"),
    "run: --output-dir is a file": row("run {ws}/ok.yaml --output-dir {ws}/a_file", "output_dir", "a_file is a file"),
    "run: unreadable data file": row("run {ws}/unreadable.yaml", "invalid recipe", f"{NOT_READABLE}: cannot read"),
    "validate: unreadable data file": row("validate {ws}/unreadable.yaml", "invalid recipe", "Permission denied"),
    "run: truncated result.json of a finished stage": row(
        "run {ws}/ok.yaml", "round_1/s/result.json cannot be read", "delete it to run the stage again"),
    "validate: GGUF magic then garbage": row("validate {ws}/gguf.yaml", "invalid recipe", "bad.gguf: damaged"),
    "run: a hub id, offline and not cached": row(
        "run {ws}/hub.yaml", "invalid recipe", "model.path: 'someorg/not-downloaded'", "HF_HUB_OFFLINE"),
    "validate: reward model max_length 1": row("validate {ws}/rm.yaml", "invalid recipe", "train.max_length must be"),
}


def _without_file_access_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (PR_CAPBSET_DROP), so that
    root, like anyone, cannot read a file of mode 000."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@functools.cache
def _can_drop() -> bool:
    try:
        subprocess.run(["true"], preexec_fn=_without_file_access_override, check=True)
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def align(ws: Path, args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(ws / "hf"), "ALIGN_CACHE": str(ws / "cache"),
           "OMP_NUM_THREADS": "1"}
    drop = os.geteuid() == 0  # every row as an ordinary user would run it: a file of mode 000 is unreadable
    if drop and not _can_drop():
        drop = False
        if any("unreadable" in a for a in args):
            pytest.skip("root reads a file of mode 000 and cannot give that right up here")
    return subprocess.run([ALIGN, *args], cwd=cwd or ws, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=_without_file_access_override if drop else None)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file (size, modification time), run-lock files aside."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and ".align.lock" not in p.name}


def problem_lines(err: str) -> list[str]:
    """One line per problem: ``error: ...``, or under ``error: FILE: invalid recipe`` the ``  - ...`` lines."""
    return [line for line in err.splitlines()
            if line.startswith("  - ") or (line.startswith("error: ") and not line.endswith("invalid recipe"))]


def test_the_table_covers_every_command():
    commands = {" ".join(args.split()[: 2 if args.startswith("eval") else 1]) for args, _, _ in CASES.values()}
    assert commands == {"eval policy", "eval reward-model", "report", "data", "run", "validate"}


@pytest.mark.parametrize("case", list(CASES))
def test_a_command_refuses_bad_input_with_one_line_per_problem(case, ws):
    args, words, problems = CASES[case]
    if "gguf" in args and importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (extra align[gguf])")
    before = snapshot(ws)
    t0 = time.monotonic()

    done = align(ws, args.format(ws=ws).split())

    seconds, err = time.monotonic() - t0, done.stderr
    assert done.returncode == 2, err
    assert err.startswith("error: ") and "Traceback" not in err and REPORT_BUG not in err, err
    assert len(problem_lines(err)) == problems == len(err.splitlines()) - ("invalid recipe" in err), err
    at = 0
    for w in words:  # in this order
        at = err.find(w, at)
        assert at >= 0, f"{w!r} not in (or out of order in): {err}"
    assert done.stdout == "", done.stdout
    assert snapshot(ws) == before, "files were written or changed"
    assert seconds < 10, f"{seconds:.1f} s: no network and no model to load, so it must be quick"


def test_output_dir_with_dots_is_taken_from_the_shell_folder(ws):
    """``--output-dir ../x`` means x beside the folder the command runs in (made absolute before validation,
    whose refusal of '..' is for a recipe's own output_dir). A finished stage there is found and skipped."""
    from align.config.recipe import load_recipe
    from align.runner import fingerprint

    (ws / "sub").mkdir()
    target = ws / "beside"
    loaded = load_recipe(ws / "ok.yaml", [f"output_dir={target}"])
    fp = fingerprint(loaded, loaded.stages[0], 1, {})
    stage = target / "ok/round_1/s"
    stage.mkdir(parents=True)
    (stage / "stage.json").write_text(json.dumps({"fingerprint": fp, "kind": "sft"}))
    (stage / "result.json").write_text(json.dumps({"fingerprint": fp, "artifacts": {"policy": "round_1/s/model"},
                                                   "metrics": {"loss": 1.0}}))

    done = align(ws, ["run", str(ws / "ok.yaml"), "--output-dir", "../beside"], cwd=ws / "sub")

    assert done.returncode == 0, done.stderr
    assert "s: up to date, skipped" in done.stdout, done.stdout
    assert (target / "ok/report.json").is_file()
    assert f"output_dir: {target}" in (target / "ok/resolved.yaml").read_text()


def test_an_unreachable_hub_is_asked_once_and_named(monkeypatch):
    """Online, a hub id costs one request: no network gives one line naming the id and what to do instead
    (transformers would retry for a minute); a cached copy is pointed at with HF_HUB_OFFLINE."""
    import huggingface_hub

    from align import compat

    calls = []

    def unreachable(repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(compat, "hub_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo_id, filename: None)
    why = compat.hub_problem("someorg/model")
    assert calls == ["someorg/model"]
    assert "'someorg/model'" in why and "cannot be reached" in why and "give a local folder" in why
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo_id, filename: "/cache/config.json")
    assert "set HF_HUB_OFFLINE=1" in compat.hub_problem("someorg/model")


def test_a_bug_prints_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    import align.cli

    def broken(args):
        return {}["no such key"]

    monkeypatch.setattr(align.cli, "_cmd_options", broken)

    assert main(["options"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'no such key'" in err
    assert err.rstrip().endswith(REPORT_BUG)
