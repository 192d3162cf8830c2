"""A tiny causal LM with a word-level tokenizer, shared by the training tests."""

from __future__ import annotations

import pytest
from helpers import torch_model
from textdata import word_tokenizer


@pytest.fixture(scope="session")
def word_model(tmp_path_factory):
    """A directory with a random tiny ModernBertDecoderForCausalLM (transformers layout) and a
    word-level tokenizer; the vocabulary is WORDS (padded to the config's 128)."""
    directory = tmp_path_factory.mktemp("word-model")
    torch_model("causal", seed=3).save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return str(directory)
