"""The stage-agnostic reference cache: hits without computing, misses on any other key part, never reads
a half-written file, keeps DPO's key (so caches written before the split still hit)."""

import hashlib

import pytest
import torch

import align.models.reference_cache as rc
from align.data.preference import examples_digest
from align.models.reference_cache import cache_key, load_or_compute
from align.train.reference import key_parts


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
    """The key DPO wrote before the cache was split out (``align.train.reference.cache_key``, inlined)."""

    class Ex:
        def __init__(self, prompt_ids, responses, dpo_masks):
            self.prompt_ids, self.responses, self.dpo_masks = prompt_ids, responses, dpo_masks

    splits = ([Ex([1, 2], [[3, 4], [5]], [[True, False], [True]])], [])
    old = hashlib.sha256(b"dpo-ref-1;MODEL;amp=bf16")
    for examples in splits:
        old.update(f"split:{len(examples)}".encode())
        examples_digest(examples, old)
    assert cache_key(key_parts("MODEL", "bf16", splits)) == old.hexdigest()[:24]
    explicit = hashlib.sha256(b"dpo-ref-1;MODEL;amp=bf16split:1"
                              + repr(([1, 2], [[3, 4], [5]], [[True, False], [True]])).encode() + b"split:0")
    assert cache_key(key_parts("MODEL", "bf16", splits)) == explicit.hexdigest()[:24]
