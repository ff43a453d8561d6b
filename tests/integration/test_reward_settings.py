"""The reward_model stage passes ``margin`` (every table, a mapping, ``column``) and ``centering_coef``
to its loss: the first training step's loss (all records in one batch, initial weights) equals the
Llama 2 ranking loss worked out here from the initial model's scores of each (prompt, response), with
the margins of Llama 2's table 28 written out by hand.
"""

import json
import math

import pytest
import torch

from align.config.recipe import recipe_from_dict
from align.config.specs import ModelSpec
from align.data.chat import EOT, tokenize_prompt
from align.losses.reward import MARGIN_TABLES
from align.models.reward import load_reward_model, load_reward_tokenizer
from align.runner import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}
# prompt, responses best first, strength, the record's own margin (TRL's column)
RECORDS = [
    ("Say apple.", ["APPLE", "Apple", "apple"], "significantly_better", 0.8),
    ("Say river.", ["RIVER", "river"], "better", 0.3),
    ("Say stone.", ["STONE", "stone"], "slightly_better", 1.7),
    ("Say cloud.", ["CLOUD", "cloud"], None, 0.5),
    ("Say tiger.", ["TIGER", "Tiger", "tiger"], "negligibly_better", 2.5),
]
# Llama 2, table 28 (and "none": Llama 3), per record above
MARGINS = {
    "none": [0.0, 0.0, 0.0, 0.0, 0.0],
    "llama2_small": [1.0, 2 / 3, 1 / 3, 0.0, 0.0],
    "llama2_large": [3.0, 2.0, 1.0, 0.0, 0.0],
    "mapping": [0.0, 0.25, 4.0, 0.0, 0.0],
    "column": [0.8, 0.3, 1.7, 0.5, 2.5],
}
SETTING = {"mapping": {"better": 0.25, "slightly_better": 4.0}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm_settings")
    rows = []
    for prompt, responses, strength, margin in RECORDS:
        row = {"prompt": prompt, "responses": responses, "margin": margin}
        if strength is not None:
            row["strength"] = strength
        rows.append(row)
    data = tmp / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the stage's initial reward model (builtin:tiny, seed 0), scoring one plain row per response
    spec = ModelSpec(path="builtin:tiny", tiny=TINY)
    tok = load_reward_tokenizer(spec, "builtin:tiny")
    model = load_reward_model(spec, "builtin:tiny", tok, seed=0).eval()
    eot = tok.convert_tokens_to_ids(EOT)
    scores = []
    for prompt, responses, _, _ in RECORDS:
        p = tokenize_prompt(tok, [{"role": "user", "content": prompt}])
        per = []
        for text in responses:
            ids = torch.tensor([p + tok(text, add_special_tokens=False)["input_ids"] + [eot]])
            with torch.no_grad():
                per.append(model(input_ids=ids).logits[0, 0].item())
        scores.append(per)
    return tmp, data, scores


def ranking_loss(scores, margins, coef):
    """Llama 2 eq. 2 per prompt (mean over its ordered pairs, the margin on pairs with the last
    response), plus coef * (r_i + r_j)^2 per pair; mean over prompts."""
    per_prompt = []
    for r, m in zip(scores, margins, strict=True):
        n, pairs = len(r), []
        for i in range(n):
            for j in range(i + 1, n):
                d = r[i] - r[j] - (m if j == n - 1 else 0.0)
                pairs.append(math.log1p(math.exp(-d)) + coef * (r[i] + r[j]) ** 2)
        per_prompt.append(sum(pairs) / len(pairs))
    return sum(per_prompt) / len(per_prompt)


def first_loss(setup, label, margin, coef):
    tmp, data, _ = setup
    stage = {"name": "rm", "kind": "reward_model", "model": {"path": "builtin:tiny", "tiny": TINY},
             "data": {"paths": [str(data)]}, "margin": margin, "centering_coef": coef, "stats_records": 0,
             "train": {"batch_size": len(RECORDS), "max_length": 96, "max_steps": 1, "report_to": [],
                       "optim": {"lr": 1e-3, "warmup_ratio": 0.0}}}
    recipe = recipe_from_dict({"name": "t", "seed": 0, "output_dir": str(tmp / label), "stages": [stage]})
    (record,) = run_recipe(recipe, log=lambda *_: None)
    return record["metrics"]["train_loss_first"]


def test_margin_tables_are_llama2_table_28():
    assert MARGIN_TABLES["none"] == {}
    assert MARGIN_TABLES["llama2_small"] == pytest.approx(
        {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0.0})
    assert MARGIN_TABLES["llama2_large"] == pytest.approx(
        {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0})


@pytest.mark.parametrize("name", list(MARGINS))
def test_margin_setting_reaches_the_loss(setup, name):
    scores = setup[2]
    got = first_loss(setup, name, SETTING.get(name, name), 0.0)
    assert got == pytest.approx(ranking_loss(scores, MARGINS[name], 0.0), abs=1e-5)
    for other, margins in MARGINS.items():  # the data tells every setting apart
        if margins != MARGINS[name]:
            assert abs(ranking_loss(scores, margins, 0.0) - got) > 1e-2, other


def test_centering_coef_reaches_the_loss(setup):
    scores = setup[2]
    got = first_loss(setup, "centering", "llama2_large", 10.0)
    want = ranking_loss(scores, MARGINS["llama2_large"], 10.0)
    assert got == pytest.approx(want, abs=1e-5)
    assert want - ranking_loss(scores, MARGINS["llama2_large"], 0.0) > 1e-3  # the term is not negligible here
