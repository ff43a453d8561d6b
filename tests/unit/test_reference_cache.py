"""The stage-agnostic reference cache: hits without computing, misses on any other key part, never reads
a half-written file, keeps DPO's key (so caches written before the split still hit); DPO's key covers the
reference model (another model, or the same folder retrained, never reuses a cache), and a model file is
read again whenever it was written."""

import contextlib
import hashlib
import json
import os
import time
from types import SimpleNamespace

import pytest
import torch

import align.models.reference_cache as rc
from align.config.specs import ModelSpec
from align.data.chat import build_byte_tokenizer
from align.data.preference import PreferenceExample, examples_digest
from align.models.loading import build_tiny_model
from align.models.reference_cache import cache_key, load_or_compute
from align.train.reference import key_parts, reference_logps


class Counter:
    def __init__(self, values):
        self.values, self.calls = values, 0

    def __call__(self):
        self.calls += 1
        return self.values


def test_second_call_hits_without_computing(tmp_path):
    compute = Counter([[-1.5, -2.25], [-0.125]])
    values, hit = load_or_compute(tmp_path / "cache", ["v1", "model", b"data"], compute)
    assert (values, hit, compute.calls) == ([[-1.5, -2.25], [-0.125]], False, 1)
    values, hit = load_or_compute(tmp_path / "cache", ["v1", "model", b"data"], compute)
    assert (values, hit, compute.calls) == ([[-1.5, -2.25], [-0.125]], True, 1)
    key = cache_key(["v1", "model", b"data"])
    assert torch.load(tmp_path / "cache" / f"{key}.pt", weights_only=True) == {"key": key, "values": values}


def test_a_different_key_part_misses(tmp_path):
    compute = Counter(torch.arange(3.0))
    load_or_compute(tmp_path, ["v1", "model", "data"], compute)
    for parts in (["v1", "model", "data2"], ["v2", "model", "data"], ["v1", "model"]):
        _, hit = load_or_compute(tmp_path, parts, compute)
        assert not hit
    assert compute.calls == 4
    assert len(list(tmp_path.glob("*.pt"))) == 4


def test_a_partial_tmp_file_is_never_a_hit(tmp_path):
    parts = ["v1", "model", "data"]
    key = cache_key(parts)
    (tmp_path / f"{key}.tmp").write_bytes(b"PK\x03\x04 cut short")  # left by a killed writer
    values, hit = load_or_compute(tmp_path, parts, Counter([1.0]))
    assert (values, hit) == ([1.0], False)
    assert not (tmp_path / f"{key}.tmp").exists()  # replaced by the complete file


def test_a_write_killed_halfway_leaves_no_hit(tmp_path, monkeypatch):
    def dies_while_writing(obj, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(rc.torch, "save", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        load_or_compute(tmp_path, ["k"], Counter([1.0]))
    monkeypatch.undo()
    compute = Counter([2.0])
    assert load_or_compute(tmp_path, ["k"], compute) == ([2.0], False) and compute.calls == 1


class FakeAccelerator:
    def __init__(self, is_main_process, on_wait=lambda: None):
        self.is_main_process, self.on_wait, self.waits = is_main_process, on_wait, 0

    def wait_for_everyone(self):
        self.waits += 1
        self.on_wait()


def test_only_the_main_process_computes(tmp_path):
    main_compute, other_compute = Counter([3.0]), Counter([99.0])
    # the other process reaches the barrier first; the main process writes the file meanwhile
    other = FakeAccelerator(False, on_wait=lambda: load_or_compute(tmp_path, ["k"], main_compute,
                                                                   accelerator=FakeAccelerator(True)))
    values, hit = load_or_compute(tmp_path, ["k"], other_compute, accelerator=other, meta={"stage": "s"})
    assert (values, hit, other_compute.calls, main_compute.calls, other.waits) == ([3.0], False, 0, 1, 1)
    assert not list(tmp_path.glob("*.json"))  # meta is written by the process that computes


def test_meta_is_written_beside_the_values(tmp_path):
    load_or_compute(tmp_path, ["k"], Counter([1.0]), meta={"stage": "dpo", "model": "m"})
    assert (tmp_path / f"{cache_key(['k'])}.json").read_text() == '{"stage": "dpo", "model": "m"}'


def test_callable_key_parts_feed_the_hash_like_their_bytes():
    assert cache_key(["ab", b"cd", lambda h: h.update(b"ef")]) == hashlib.sha256(b"abcdef").hexdigest()[:24]


def test_dpo_key_is_unchanged():
    """The key DPO writes, spelled out (version 2: the cached value holds the frozen layers' states too)."""

    class Ex:
        def __init__(self, prompt_ids, responses, dpo_masks):
            self.prompt_ids, self.responses, self.dpo_masks = prompt_ids, responses, dpo_masks

    splits = ([Ex([1, 2], [[3, 4], [5]], [[True, False], [True]])], [])
    old = hashlib.sha256(b"dpo-ref-2;MODEL;amp=bf16")
    for examples in splits:
        old.update(f"split:{len(examples)}".encode())
        examples_digest(examples, old)
    assert cache_key(key_parts("MODEL", "bf16", splits)) == old.hexdigest()[:24]
    explicit = hashlib.sha256(b"dpo-ref-2;MODEL;amp=bf16split:1"
                              + repr(([1, 2], [[3, 4], [5]], [[True, False], [True]])).encode() + b"split:0")
    assert cache_key(key_parts("MODEL", "bf16", splits)) == explicit.hexdigest()[:24]


# --- the reference model is part of the key ---------------------------------------------------------------

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}
EXAMPLES = [PreferenceExample([1, 40, 41], [[50, 51, 52], [60, 61]], [[True, True, False], [True, False]],
                              [(0, 1)]),
            PreferenceExample([2, 42], [[70], [71, 72, 73]], [[True], [True, True, True]], [(0, 1)])]


class CPUAccelerator:
    device, is_main_process, autocast = "cpu", True, staticmethod(contextlib.nullcontext)

    def wait_for_everyone(self):
        pass


def save_model(folder, seed):
    spec = ModelSpec(path="builtin:tiny", tiny=TINY)
    build_tiny_model(spec, len(build_byte_tokenizer()), seed=seed).save_pretrained(folder)


def dpo_reference(folder, run_dir):
    """DPO's reference log-probs of EXAMPLES with the model saved in ``folder`` as the reference, cached in
    ``run_dir/ref_cache``: -> (values, {"ref_cache_hit", "ref_forward_passes", "trunk_layers"})."""
    stage = SimpleNamespace(name="dpo", model=ModelSpec(path="builtin:tiny", tiny=TINY),
                            reference=ModelSpec(path=str(folder)),
                            train=SimpleNamespace(mixed_precision="no", batch_size=2))
    ctx = SimpleNamespace(seed=0, recipe=SimpleNamespace(run_dir=str(run_dir)),
                          model_path=lambda spec: spec.path)
    (values,), _, info = reference_logps(stage, ctx, None, build_byte_tokenizer(), (EXAMPLES,), CPUAccelerator())
    return values, info


def test_another_reference_model_never_reuses_the_cache(tmp_path):
    """Same data, same settings: another reference model (another folder, or the same folder retrained)
    misses and gets its own values; the same model hits."""
    a, b = tmp_path / "a", tmp_path / "b"
    save_model(a, seed=0)
    save_model(b, seed=1)
    first, info = dpo_reference(a, tmp_path / "run")
    assert info == {"ref_cache_hit": 0.0, "ref_forward_passes": 1.0, "trunk_layers": 0.0}
    again, info = dpo_reference(a, tmp_path / "run")
    assert info["ref_cache_hit"] == 1.0 and again == first
    other, info = dpo_reference(b, tmp_path / "run")
    assert info["ref_cache_hit"] == 0.0 and other != first
    assert other == dpo_reference(b, tmp_path / "fresh_run")[0]  # b's own numbers, not a's
    save_model(a, seed=2)  # the same path, retrained weights
    retrained, info = dpo_reference(a, tmp_path / "run")
    assert info["ref_cache_hit"] == 0.0 and retrained not in (first, other)
    assert len(list((tmp_path / "run" / "ref_cache").glob("*.pt"))) == 3


def test_file_digests_are_remembered_until_the_file_is_written(tmp_path, monkeypatch):
    reads = []
    monkeypatch.setattr(rc, "sha256_file", lambda p, real=rc.sha256_file: reads.append(p) or real(p))
    monkeypatch.setattr(rc, "_SETTLED_NS", 50_000_000)  # 50 ms instead of 2 s, so the test can wait it out
    f, memo = tmp_path / "model.safetensors", tmp_path / "memo.json"
    f.write_bytes(b"a" * 1000)
    time.sleep(0.2)
    first = rc.file_digest(f, memo)
    assert rc.file_digest(f, memo) == first == hashlib.sha256(b"a" * 1000).hexdigest() and len(reads) == 1
    st = f.stat()
    f.write_bytes(b"b" * 1000)  # same size, and the modification time set back: its change time still moves
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns
    assert rc.file_digest(f, memo) == hashlib.sha256(b"b" * 1000).hexdigest() and len(reads) == 2
    rc.file_digest(f, memo)  # written just now: not remembered yet (a write in the same clock tick is unseen)
    assert len(reads) == 3


def test_the_model_identity_covers_gguf_files_and_a_lora_base(tmp_path):
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "a.gguf").write_bytes(b"GGUF a")
    (folder / "b.gguf").write_bytes(b"GGUF b")

    def gguf(name):
        return rc.model_identity(ModelSpec(path=str(folder), gguf_file=name), str(folder), 0)

    a = gguf("a.gguf")
    assert a != gguf("b.gguf")
    (folder / "a.gguf").write_bytes(b"GGUF c")
    assert gguf("a.gguf") != a
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    save_model(base, seed=0)
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 4}))
    before = rc.model_identity(ModelSpec(path=str(adapter)), str(adapter), 0)
    save_model(base, seed=1)  # another base model under the same adapter
    assert rc.model_identity(ModelSpec(path=str(adapter)), str(adapter), 0) != before
