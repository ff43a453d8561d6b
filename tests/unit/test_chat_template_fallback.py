"""A tokenizer without a chat template gets the Llama 3 one, with a warning that says so."""

from __future__ import annotations

import warnings

import pytest

from align.config.specs import ModelSpec
from align.data.chat import build_builtin_tokenizer
from align.models.loading import NoChatTemplate, load_tokenizer


def test_the_fallback_template_is_announced(tmp_path):
    tok = build_builtin_tokenizer("builtin:bytes")
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "no_template")
    with pytest.warns(NoChatTemplate, match="no chat template"):
        loaded = load_tokenizer(ModelSpec(path=str(tmp_path / "no_template")), str(tmp_path / "no_template"))
    assert loaded.chat_template
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoChatTemplate)  # a tokenizer with a template: no warning
        load_tokenizer(ModelSpec(path="builtin:tiny"), "builtin:tiny")
