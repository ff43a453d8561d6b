"""SFT's ``system_prompt``: added to records that have no system turn, records with one (``system``
field or a leading system message) unchanged; and it reaches the tokens trained on: the first step's
loss equals the NLL of the assistant tokens computed here, by hand, on the conversation WITH the system
turn for the record that had none."""

import json
import math

import pytest
import torch

from align.config.recipe import recipe_from_dict
from align.config.specs import DataSpec, ModelSpec
from align.data.chat import BOS, END_HEADER, EOT, START_HEADER, build_byte_tokenizer
from align.data.sources import load_sft
from align.models.loading import build_tiny_model
from align.runner import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}
SYSTEM = "You answer in capitals only."
ROWS = [
    {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "HELLO."}]},
    {"messages": [{"role": "user", "content": "Say bye."}, {"role": "assistant", "content": "Bye."}],
     "system": "Own system field."},
    {"messages": [{"role": "system", "content": "Own system turn."}, {"role": "user", "content": "Say yes."},
                  {"role": "assistant", "content": "yes"}]},
]


def conversations(with_system: bool) -> list[list[tuple[str, str]]]:
    """What each record should train on, as (role, content) turns."""
    out = []
    for row in ROWS:
        turns = [(m["role"], m["content"]) for m in row["messages"]]
        if "system" in row:
            turns = [("system", row["system"]), *turns]
        elif turns[0][0] != "system" and with_system:
            turns = [("system", SYSTEM), *turns]
        out.append(turns)
    return out


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_system_prompt_added_only_where_there_is_none(data):
    train, _ = load_sft(DataSpec(paths=[str(data)]), [str(data)], 0, SYSTEM)
    got = [[(m.role, m.content) for m in r.conversation()] for r in train]
    assert got == conversations(with_system=True)
    plain, _ = load_sft(DataSpec(paths=[str(data)]), [str(data)], 0, None)
    assert [[(m.role, m.content) for m in r.conversation()] for r in plain] == conversations(with_system=False)


def hand_nll(turns_per_record) -> float:
    """Mean NLL over the assistant tokens (content + eot) of the initial builtin:tiny model (seed 0),
    the Llama 3 format written out piece by piece."""
    tok = build_byte_tokenizer()
    lm = build_tiny_model(ModelSpec(path="builtin:tiny", tiny=TINY), len(tok), seed=0).eval()

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    total, count = 0.0, 0
    for turns in turns_per_record:
        seq, scored = ids(BOS), [False]
        for role, content in turns:
            head = ids(f"{START_HEADER}{role}{END_HEADER}\n\n")
            body = ids(content) + ids(EOT)
            seq += head + body
            scored += [False] * len(head) + [role == "assistant"] * len(body)
        with torch.no_grad():
            lp = lm(input_ids=torch.tensor([seq])).logits[0].float().log_softmax(-1)
        for t in range(1, len(seq)):
            if scored[t]:
                total -= lp[t - 1, seq[t]].item()
                count += 1
    return total / count


def first_loss(tmp_path, data, system_prompt, packing):
    stage = {"name": "sft", "kind": "sft", "model": {"path": "builtin:tiny", "tiny": TINY},
             "data": {"paths": [str(data)]}, "system_prompt": system_prompt, "packing": packing,
             "train": {"batch_size": len(ROWS), "max_length": 128, "max_steps": 1, "report_to": [],
                       "optim": {"lr": 1e-3, "warmup_ratio": 0.0}}}
    out = tmp_path / f"runs_{system_prompt is not None}_{packing}"
    recipe = recipe_from_dict({"name": "t", "seed": 0, "output_dir": str(out), "stages": [stage]})
    (record,) = run_recipe(recipe, log=lambda *_: None)
    return record["metrics"]["train_loss_first"]


@pytest.mark.parametrize("packing", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["padded", "packed"])
def test_system_prompt_reaches_the_trained_tokens(tmp_path, data, packing):
    with_system, without = hand_nll(conversations(True)), hand_nll(conversations(False))
    assert abs(with_system - without) > 1e-4  # the system turn changes the assistant tokens' context
    assert first_loss(tmp_path, data, SYSTEM, packing) == pytest.approx(with_system, rel=1e-5)
    assert first_loss(tmp_path, data, None, packing) == pytest.approx(without, rel=1e-5)
    assert math.isfinite(with_system)
