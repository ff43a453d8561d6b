"""The DPO stage passes its settings through: beta, nll_weight, label_smoothing and formatting_tokens.

The policy and an explicit reference are two different tiny models saved to disk, so at the start of
training h = (log pi - log ref)(chosen) - (...)(rejected) is not 0 and every start metric depends on the
settings. The expected values are computed here with plain transformers on prompt + response ids
written out by hand (the template text, the content bytes, then <|eot_id|>), not with align's tokenizer
of preferences or its loss.
"""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from align.config.recipe import recipe_from_dict
from align.config.specs import ModelSpec
from align.data.chat import EOT, START_HEADER, build_byte_tokenizer, tokenize_prompt
from align.models.loading import build_tiny_model
from align.runner import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1}
RECORDS = [
    {"prompt": "What is 2 plus 3?", "chosen": "2 plus 3 is 5.", "rejected": "It is 7, I think."},
    {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "A color is a thing."},
    {"prompt": "Spell cat backwards.", "chosen": "tac", "rejected": "cat backwards"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo_settings")
    tok = build_byte_tokenizer()
    folders = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        folder = tmp / name
        build_tiny_model(ModelSpec(path="builtin:tiny", tiny=TINY), len(tok), seed=seed).save_pretrained(folder)
        tok.save_pretrained(folder)
        folders[name] = folder
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    # per record, per (chosen, rejected): the token log-probs of content tokens and of the final eot
    eot = tok.convert_tokens_to_ids(EOT)
    logps = {}
    for name, folder in folders.items():
        lm = AutoModelForCausalLM.from_pretrained(folder).eval()
        per_record = []
        for r in RECORDS:
            prompt = tokenize_prompt(tok, [{"role": "user", "content": r["prompt"]}])
            pair = []
            for text in (r["chosen"], r["rejected"]):
                resp = tok(text, add_special_tokens=False)["input_ids"] + [eot]  # one token per byte
                ids = torch.tensor([prompt + resp])
                with torch.no_grad():
                    lp = lm(input_ids=ids).logits[0].float().log_softmax(-1)
                tokens = [lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(resp)]
                pair.append((tokens[:-1], tokens[-1]))
            per_record.append(pair)
        logps[name] = per_record
    return tmp, folders, data, logps


def run_dpo(setup, label, **stage_kw):
    tmp, folders, data, _ = setup
    stage = {
        "name": "dpo", "kind": "dpo", "model": {"path": str(folders["policy"])},
        "reference": {"path": str(folders["reference"])},
        "data": {"paths": [str(data)]}, "metrics_records": len(RECORDS),
        "train": {"batch_size": len(RECORDS), "max_length": 128, "max_steps": 1, "report_to": [],
                  "optim": {"lr": 1e-3, "warmup_ratio": 0.0}},
        **stage_kw,
    }
    out = tmp / label
    recipe = recipe_from_dict({"name": "t", "seed": 0, "output_dir": str(out), "stages": [stage]})
    (record,) = run_recipe(recipe, log=lambda *_: None)
    rows = [json.loads(x) for x in open(out / "t/round_1/dpo/metrics.jsonl")]
    start = next(r for r in rows if "start/train_pairs_loss" in r)
    return {k.removeprefix("start/train_pairs_"): v for k, v in start.items() if k.startswith("start/")}, record


def expected(logps, beta, nll_weight, eps, eot_in_sums):
    """Start metrics (means over the pairs) worked out from the token log-probs."""

    def dpo_sum(content, eot_lp):
        return sum(content) + (eot_lp if eot_in_sums else 0.0)

    hs, prefs, nlls, chosen = [], [], [], []
    for pol, ref in zip(logps["policy"], logps["reference"], strict=True):
        pc, pr = dpo_sum(*pol[0]), dpo_sum(*pol[1])
        rc, rr = dpo_sum(*ref[0]), dpo_sum(*ref[1])
        h = (pc - rc) - (pr - rr)
        x = beta * h
        prefs.append((1 - eps) * math.log1p(math.exp(-x)) + eps * math.log1p(math.exp(x)))
        content, eot_lp = pol[0]
        nlls.append(-(sum(content) + eot_lp) / (len(content) + 1))  # the eot is always in the NLL
        hs.append(h)
        chosen.append(pc)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"dpo": mean(prefs), "nll": mean(nlls), "loss": mean(prefs) + nll_weight * mean(nlls),
            "reward_margin": beta * mean(hs), "logps_chosen": mean(chosen)}


def check(got, want):
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


def test_beta_nll_weight_and_label_smoothing_reach_the_loss(setup):
    beta, nll_weight, eps = 0.7, 0.35, 0.2
    got, record = run_dpo(setup, "settings", beta=beta, nll_weight=nll_weight, label_smoothing=eps)
    logps = setup[3]
    want = expected(logps, beta, nll_weight, eps, eot_in_sums=False)
    check(got, want)
    # the settings matter on this data: the defaults (0.1, 0.2, 0) give clearly different numbers
    default = expected(logps, 0.1, 0.2, 0.0, eot_in_sums=False)
    assert abs(default["dpo"] - want["dpo"]) > 1e-2 and abs(default["loss"] - want["loss"]) > 1e-2
    assert abs(want["reward_margin"]) > 1e-2
    m = record["metrics"]
    assert m["train_pairs_dpo_start"] == pytest.approx(want["dpo"], rel=1e-4, abs=1e-5)
    assert m["train_pairs_reward_margin_start"] == pytest.approx(want["reward_margin"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("formatting,eot_in_sums", [("auto", False), ("off", True), ([EOT], False),
                                                    ([START_HEADER], True)], ids=["auto", "off", "eot", "header"])
def test_formatting_tokens_setting_decides_whether_eot_is_in_the_sums(setup, formatting, eot_in_sums):
    label = formatting if isinstance(formatting, str) else "list_" + formatting[0].strip("<|>")
    got, _ = run_dpo(setup, label, beta=1.0, nll_weight=0.2, formatting_tokens=formatting)
    want = expected(setup[3], 1.0, 0.2, 0.0, eot_in_sums=eot_in_sums)
    check(got, want)
    other = expected(setup[3], 1.0, 0.2, 0.0, eot_in_sums=not eot_in_sums)
    assert abs(other["logps_chosen"] - want["logps_chosen"]) > 1.0  # an eot log-prob is ~ -log(262)
