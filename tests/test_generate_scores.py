"""`generate(..., return_dict_in_generate=True, output_scores=True, output_logits=True)`: the
scores (processed logits), raw logits and chosen tokens' log-probabilities equal transformers'
(`scores`, `logits`, `compute_transition_scores(..., normalize_logits=True)`), greedy and
sampled; keeping them changes no token; and each bad option is an error that names it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_ids
from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper

import ettin_jax as ej
from ettin_jax.generation import GenerationError

NEW = 8
OUTPUTS = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)


def stacked(steps) -> np.ndarray:
    """A tuple of (B, V) arrays, one per step, as one (B, steps, V) float32 array."""
    return np.stack([np.asarray(s, np.float32) for s in steps], axis=1)


def test_greedy_scores_logits_and_logprobs_match_transformers(causal_pair):
    """Ragged prompts, EOS suppressed for two steps (min_new_tokens: scores differ from logits
    there), and a row that ends early: equal to transformers wherever the row is live; our
    logprobs are 0 on the padding after EOS."""
    reference, model = causal_pair
    prompts = [random_ids(1, 7, seed=1)[0].tolist(), random_ids(1, 4, seed=2)[0].tolist()]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=2, pad_token_id=0)
    with torch.no_grad():
        free = reference.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None, **kwargs)
        eos = int(free[1, width + 3])  # row 1 makes it 4th: call it EOS
        theirs = reference.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=eos, **kwargs, **OUTPUTS)
        transition = reference.compute_transition_scores(theirs.sequences, theirs.scores, normalize_logits=True)
    ours = model.generate(prompts, eos_token_id=eos, **kwargs, **OUTPUTS)
    np.testing.assert_array_equal(ours.sequences, theirs.sequences.numpy())
    new = ours.sequences[:, width:]
    live = np.cumsum(new == eos, axis=1) - (new == eos) == 0  # through each row's EOS
    assert not live[1].all() and live[0].all()  # row 1 ended early
    assert len(ours.scores) == len(ours.logits) == len(theirs.scores) == new.shape[1]
    for got, expected in ((ours.scores, theirs.scores), (ours.logits, theirs.logits)):
        np.testing.assert_allclose(stacked(got)[live], stacked(expected)[live], atol=1e-4)
    assert np.isneginf(stacked(ours.scores)[:, :2, eos]).all()  # min_new_tokens: the logits are not the scores
    np.testing.assert_allclose(ours.logprobs[live], transition.numpy()[live], atol=1e-4)
    assert (ours.logprobs[~live] == 0).all() and ours.logprobs.dtype == np.float32


def test_sampled_scores_are_the_processed_logits_of_the_sampled_tokens(causal_pair):
    """Sampling (repetition penalty, temperature, top-k) draws other tokens than torch's RNG, so
    the reference is transformers' processors applied to its own logits of our sequences."""
    reference, model = causal_pair
    ids = random_ids(2, 5, seed=3)
    kwargs = dict(max_new_tokens=NEW, do_sample=True, top_k=5, temperature=0.7, repetition_penalty=1.3, seed=0,
                  eos_token_id=[])  # fmt: skip
    ours = model.generate(ids, **kwargs, **OUTPUTS)
    plain = model.generate(ids, **kwargs, return_dict_in_generate=True)
    np.testing.assert_array_equal(plain.sequences, ours.sequences)  # keeping scores changes no token
    assert plain.scores is None and plain.logits is None and plain.logprobs is None
    sequences = torch.tensor(ours.sequences, dtype=torch.long)
    processors = [RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(5)]
    with torch.no_grad():
        logits = reference(sequences).logits[:, ids.shape[1] - 1 : -1]
        expected = []
        for step in range(NEW):
            scores = logits[:, step]
            for processor in processors:
                scores = processor(sequences[:, : ids.shape[1] + step], scores)
            expected.append(scores)
        transition = reference.compute_transition_scores(sequences, tuple(expected), normalize_logits=True)
    np.testing.assert_allclose(stacked(ours.logits), logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(stacked(ours.scores), stacked(expected), atol=1e-4)  # -inf where top-k removed
    assert (np.isfinite(stacked(ours.scores)).sum(-1) == 5).all()
    np.testing.assert_allclose(ours.logprobs, transition.numpy(), atol=1e-4)
    no_dict = model.generate(ids, **kwargs, output_scores=True, output_logits=True)  # as transformers: the ids
    np.testing.assert_array_equal(no_dict, ours.sequences)


@pytest.mark.parametrize("name", ["return_dict_in_generate", "output_scores", "output_logits"])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_output_options_must_be_bools(causal_pair, name, value):
    _, model = causal_pair
    with pytest.raises(GenerationError, match=f"{name} must be True or False"):
        model.generate([[5, 6]], **{name: value})


@pytest.mark.parametrize("name", ["return_dict_in_generate", "output_scores", "output_logits"])
def test_what_returns_no_scores_names_the_option(causal_pair, name):
    _, model = causal_pair
    pipe = ej.pipeline("text-generation", model=model, tokenizer=object())
    for call in (model.generate_stream, model.generate_batch, lambda ids, **k: pipe("text", **k)):
        with pytest.raises(GenerationError, match=f"{name}: .* returns no scores"):
            call([[5, 6]], **{name: True})
