"""The embedded default model knows some English: it continues the README's prompts with words,
and it predicts held-out text far better than a uniform guess."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
from transformers import AutoTokenizer

import ettin_jax as ej
from ettin_jax import default_model
from ettin_jax.train.data import pack_blocks


@pytest.fixture(scope="module")
def generator():
    return ej.pipeline("text-generation")


@pytest.fixture(scope="module")
def words() -> set[str]:
    """The corpus' words seen at least three times, shipped beside the model."""
    with open(os.path.join(default_model.path(), "words.txt"), encoding="utf-8") as f:
        return set(f.read().split())


def test_ships_inside_the_package_with_its_tokenizer():
    directory = default_model.path()
    assert os.path.dirname(os.path.dirname(directory)) == os.path.dirname(os.path.abspath(ej.__file__))
    config = default_model.config()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert len(tokenizer) <= config.vocab_size
    named = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert named == ("[CLS]", "[SEP]", "[PAD]")  # Ettin's conventions
    ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in named)
    assert ids == (config.bos_token_id, config.eos_token_id, config.pad_token_id)
    assert os.path.getsize(os.path.join(directory, "model.safetensors")) < 8 * 2**20
    # The README's mesh example splits heads and the MLP over tensor=2.
    assert config.num_attention_heads % 2 == 0 and config.intermediate_size % 2 == 0


@pytest.mark.parametrize("prompt", ["Once upon a time", "The capital of France is", "The answer is", "Hello"])
def test_greedy_continuations_are_mostly_words(generator, words, prompt):
    text = generator(prompt, max_new_tokens=24, return_full_text=False)[0]["generated_text"]
    pieces = text.split()
    known = [p for p in pieces if re.sub(r"^\W+|\W+$", "", p).lower() in words]
    assert len(pieces) >= 8 and len(known) >= 0.8 * len(pieces), text


def test_held_out_perplexity_is_far_below_uniform():
    directory = default_model.path()
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    with open(os.path.join(directory, "heldout-sample.txt"), encoding="utf-8") as f:
        paragraphs = f.read().strip().split("\n\n")
    config = model.config
    blocks = pack_blocks(tokenizer, paragraphs, 128, config.bos_token_id, config.eos_token_id)[0][:8]
    assert len(blocks) == 8  # a thousand tokens of text the model never saw
    perplexity = math.exp(float(model(input_ids=blocks, labels=blocks).loss))
    assert np.isfinite(perplexity) and perplexity < config.vocab_size / 10, perplexity
