"""Generation: token parity with transformers' greedy generate, the cache against full forward
passes, the sampling filters on hand-made logits, bucketing, streaming and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import TINY, random_ids

import ettin_jax as ej
from ettin_jax import generation, sampling
from ettin_jax.cache import init_cache
from ettin_jax.generation import GenerationError
from ettin_jax.padding import left_pad


def left_padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :], mask[i, width - len(prompt) :] = prompt, 1
    return ids, mask


def reference_generate(reference, ids, mask, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return reference.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, pad_token_id=0, **kwargs
        ).numpy()


PROMPT_LONG = random_ids(1, 11, seed=1)[0].tolist()  # window is 4: the prompt spans several
PROMPT_SHORT = random_ids(1, 3, seed=2)[0].tolist()
PROMPT_MID = random_ids(1, 6, seed=3)[0].tolist()

GREEDY_CASES = {
    "prompt_longer_than_window": ([PROMPT_LONG], dict(max_new_tokens=8)),
    "several_windows_past_prompt": ([PROMPT_SHORT], dict(max_new_tokens=40)),
    "ragged_batch": ([PROMPT_LONG, PROMPT_SHORT, PROMPT_MID], dict(max_new_tokens=24)),
    "repetition_penalty": ([PROMPT_MID, PROMPT_LONG[:6]], dict(max_new_tokens=24, repetition_penalty=1.5)),
    "min_new_tokens_and_max_length": ([PROMPT_MID], dict(max_length=20, min_new_tokens=5)),
}


@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_greedy_tokens_match_transformers(causal_pair, case):
    reference, model = causal_pair
    prompts, kwargs = GREEDY_CASES[case]
    ids, mask = left_padded(prompts)
    expected = reference_generate(reference, ids, mask, eos_token_id=None, **kwargs)
    got = model.generate(ids, attention_mask=mask, eos_token_id=[], **kwargs)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_eos_stops_rows_and_pads_after_it(causal_pair):
    reference, model = causal_pair
    ids, mask = left_padded([PROMPT_LONG, PROMPT_SHORT])
    free = model.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[])
    eos = int(free[0, ids.shape[1] + 4])  # row 0 makes this token 5th: call it EOS
    expected = reference_generate(reference, ids, mask, eos_token_id=eos, max_new_tokens=30)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=eos)
    np.testing.assert_array_equal(got, expected)
    new = got[0, ids.shape[1] :]
    first = int(np.argmax(new == eos))
    assert first <= 4 and (new[first + 1 :] == 0).all()  # pad id 0 after EOS


@pytest.mark.parametrize("impl", ["xla_blocked", "splash"])
def test_prefill_runs_each_backend(causal_pair, impl, monkeypatch):
    """The prefill runs the model's attention backend: on a ragged left-padded batch longer than
    the window, each backend's first logits and cached keys equal the dense backend's, and the
    greedy continuation is the same."""
    from ettin_jax import attention

    _, model = causal_pair
    calls = []
    backend = {"xla_blocked": "blocked_local_attention", "splash": "splash_attention"}[impl]
    original = getattr(attention, backend)
    monkeypatch.setattr(attention, backend, lambda *a, **k: calls.append(1) or original(*a, **k))
    prompts = [PROMPT_LONG + PROMPT_MID + PROMPT_LONG, PROMPT_SHORT, PROMPT_MID]
    batch = left_pad(prompts, pad_id=0, batch_bucket=False)
    ids, valid = jnp.asarray(batch.ids), jnp.asarray(batch.mask)
    results = {}
    for name in ("xla", impl):
        model.set_attention_impl(name)
        results[name] = generation._prefill(model, ids, valid, 64, model.output_kernel())
        results[name + " tokens"] = model.generate(prompts, max_new_tokens=8, eos_token_id=[])
    model.set_attention_impl("auto")
    assert calls, f"the prefill never called {backend}"
    (ref_logits, ref_positions, ref_cache), (logits, positions, cache) = results["xla"], results[impl]
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    np.testing.assert_array_equal(positions, ref_positions)
    for ref, got in zip(ref_cache.layers, cache.layers, strict=True):
        real = np.asarray(ref.index >= 0)[:, None, :, None]
        np.testing.assert_array_equal(got.index, ref.index)
        np.testing.assert_allclose(np.where(real, got.k, 0), np.where(real, ref.k, 0), atol=1e-5)
        np.testing.assert_allclose(np.where(real, got.v, 0), np.where(real, ref.v, 0), atol=1e-5)
    np.testing.assert_array_equal(results[impl + " tokens"], results["xla tokens"])


def test_a_pad_id_outside_the_vocabulary_pads_without_poisoning(causal_pair):
    """transformers takes any pad id; padding embeds as token 0, so a pad id outside the
    vocabulary (NaN by design when embedded under jit) changes no token."""
    _, model = causal_pair
    prompts = [PROMPT_LONG, PROMPT_SHORT]
    expected = model.generate(prompts, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    got = model.generate(prompts, max_new_tokens=6, eos_token_id=[], pad_token_id=TINY["vocab_size"] + 872)
    width = len(PROMPT_LONG)
    np.testing.assert_array_equal(got[:, width:], expected[:, width:])
    assert (got[1, : width - len(PROMPT_SHORT)] == TINY["vocab_size"] + 872).all()  # the prompt's padding


def test_cache_logits_equal_full_forward_at_every_step(causal_pair):
    _, model = causal_pair
    prompts = [PROMPT_LONG, PROMPT_SHORT]
    steps = 12
    full = model.generate(*left_padded(prompts), max_new_tokens=steps, eos_token_id=[])
    batch = left_pad(prompts, pad_id=0, batch_bucket=False)
    width, offset = batch.width, batch.ids.shape[1] - batch.width
    # The model is causal, so one full forward over the final tokens gives, at column t, the
    # logits of a fresh forward over the tokens up to t.
    valid = np.concatenate([batch.mask[:, offset:], np.ones((2, steps), bool)], axis=1)
    expected = np.asarray(model(full, attention_mask=valid).logits)
    kernel = model.output_kernel()
    logits, positions, cache = generation._prefill(model, jnp.asarray(batch.ids), jnp.asarray(batch.mask), 64, kernel)
    step_fn = nnx.jit(generation._step)
    for step in range(steps):
        np.testing.assert_allclose(np.asarray(logits), expected[:, width - 1 + step], atol=1e-4, err_msg=f"step {step}")
        token = jnp.asarray(full[:, width + step], jnp.int32)
        logits, cache = step_fn(model, token, positions, cache, kernel)
        positions = positions + 1


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the output kernel is kept across calls on CPU only")
def test_kept_output_kernel_follows_the_parameters(causal_pair):
    """On CPU generation keeps the transposed vocabulary projection between calls; a parameter
    replaced since (as an optimizer step replaces them) must be seen, never a stale copy."""
    _, loaded = causal_pair
    model = nnx.merge(*nnx.split(loaded))  # a model of this test's own, with the same weights
    prompts = [PROMPT_LONG, PROMPT_SHORT]
    before = model.generate(prompts, max_new_tokens=6, eos_token_id=[])
    kept = generation._KEPT_KERNELS[model][1]
    assert np.array_equal(model.generate(prompts, max_new_tokens=6, eos_token_id=[]), before)
    assert generation._KEPT_KERNELS[model][1] is kept  # reused, not derived again
    table = model.model.embeddings.tok_embeddings
    table.embedding[...] = table.embedding[...][::-1]  # a new array in the same variable
    after = model.generate(prompts, max_new_tokens=6, eos_token_id=[])
    assert generation._KEPT_KERNELS[model][1] is not kept
    fresh = nnx.merge(*nnx.split(model))  # nothing kept for it: derives from the new weights
    assert np.array_equal(after, fresh.generate(prompts, max_new_tokens=6, eos_token_id=[]))
    assert not np.array_equal(after, before)  # the change mattered, so a stale copy would show


def test_sliding_cache_is_a_ring_of_window_slots(causal_pair):
    """Sliding layers hold a window of slots, in a preallocated cache and in one grown by calls."""
    _, model = causal_pair
    window = [kind == "sliding_attention" for kind in model.config.layer_types]
    preallocated = init_cache(model.config, 2, 64)
    assert [c.k.shape[2] for c in preallocated.layers] == [4 if w else 64 for w in window]  # (B, N, S, H)
    grown = model(np.array([PROMPT_LONG]), use_cache=True).past_key_values
    assert [c.slots for c in grown.layers] == [4 if w else 11 for w in window]
    grown = model(np.array([PROMPT_SHORT]), past_key_values=grown).past_key_values
    assert [c.slots for c in grown.layers] == [4 if w else 14 for w in window] and int(grown.length) == 14


# ---- sampling filters on hand-made logits ------------------------------------------------
LOGITS = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.1, 0.15, 0.2, 0.5]], jnp.float32))


def kept(filtered) -> list[list[int]]:
    return [np.flatnonzero(np.isfinite(row)).tolist() for row in np.asarray(filtered)]


@pytest.mark.parametrize(("k", "expected"), [(1, [[0], [4]]), (3, [[0, 1, 2], [2, 3, 4]]), (0, [[0, 1, 2, 3, 4]] * 2)])
def test_top_k_keeps_the_k_largest(k, expected):
    assert kept(sampling.top_k_filter(LOGITS, jnp.int32(k))) == expected


def test_top_k_keeps_ties():
    logits = jnp.array([[1.0, 2.0, 2.0, 0.0]])
    assert kept(sampling.top_k_filter(logits, jnp.int32(1))) == [[1, 2]]


@pytest.mark.parametrize(
    ("p", "expected"),
    [(0.5, [[0], [4]]), (0.6, [[0, 1], [3, 4]]), (0.85, [[0, 1, 2], [2, 3, 4]]), (1.0, [[0, 1, 2, 3, 4]] * 2)],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(sampling.top_p_filter(LOGITS, jnp.float32(p))) == expected


def test_top_p_always_keeps_the_top_token():
    assert kept(sampling.top_p_filter(LOGITS, jnp.float32(1e-6))) == [[0], [4]]


@pytest.mark.parametrize(
    ("min_p", "expected"), [(0.3, [[0, 1, 2], [2, 3, 4]]), (0.5, [[0], [4]]), (0.0, [[0, 1, 2, 3, 4]] * 2)]
)
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p, expected):
    # 0.3 * 0.5 = 0.15: 0.15 stays (not below), 0.1 goes.
    assert kept(sampling.min_p_filter(LOGITS, jnp.float32(min_p))) == expected


def test_argmax_is_jnp_argmax_on_ties_infinities_and_nan():
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 4, size=(6, 37)).astype(np.float32)  # many ties
    logits[1] = -np.inf
    logits[2, [5, 9]] = np.inf
    logits[3, [4, 11]] = np.nan
    logits[4, -1] = 10.0
    got = jax.jit(sampling.argmax)(logits)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, jnp.argmax(logits, axis=-1))
    assert got[1:5].tolist() == [0, 5, 4, 36]


def test_temperature_and_penalty_values():
    config = sampling.SamplingConfig(do_sample=True, temperature=0.5, repetition_penalty=2.0)
    logits = jnp.array([[2.0, -2.0, 1.0]])
    seen = jnp.array([[True, True, False]])
    out = sampling.process_logits(
        logits, config.static(), config.values(), seen, jnp.array([], jnp.int32), jnp.array([False])
    )
    np.testing.assert_allclose(np.asarray(out), [[2.0, -8.0, 2.0]])  # (2/2, -2*2, 1) / 0.5


def test_min_new_tokens_suppresses_eos():
    out = sampling.suppress(jnp.zeros((2, 4)), jnp.array([1, 3]), jnp.array([True, False]))
    assert np.isneginf(np.asarray(out)[0]).tolist() == [False, True, False, True]
    assert np.isfinite(np.asarray(out)[1]).all()


# ---- sampling through generate -----------------------------------------------------------
def test_same_seed_same_tokens_and_return_sequences(causal_pair):
    _, model = causal_pair
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.5, num_return_sequences=3, eos_token_id=[])
    a = model.generate([PROMPT_MID, PROMPT_SHORT], seed=7, **kwargs)
    b = model.generate([PROMPT_MID, PROMPT_SHORT], seed=7, **kwargs)
    c = model.generate([PROMPT_MID, PROMPT_SHORT], seed=8, **kwargs)
    assert a.shape == (6, 6 + 12)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert len({tuple(row) for row in a[:3, 6:]}) > 1  # the three samples of prompt 0 differ
    np.testing.assert_array_equal(a[3:, 3:6], np.tile(PROMPT_SHORT, (3, 1)))  # row order: repeat_interleave


def test_top_k_one_sampling_is_greedy(causal_pair):
    _, model = causal_pair
    greedy = model.generate([PROMPT_LONG], max_new_tokens=10, eos_token_id=[])
    sampled = model.generate([PROMPT_LONG], max_new_tokens=10, eos_token_id=[], do_sample=True, top_k=1, seed=3)
    np.testing.assert_array_equal(greedy, sampled)


def test_stream_yields_the_same_tokens(causal_pair):
    _, model = causal_pair
    ids, mask = left_padded([PROMPT_LONG, PROMPT_SHORT])
    full = model.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=[])
    steps = list(model.generate_stream(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=[]))
    assert len(steps) == 9
    np.testing.assert_array_equal(np.stack(steps, axis=1), full[:, ids.shape[1] :])


def test_buckets_avoid_recompiling(causal_pair):
    _, model = causal_pair
    model.generate([PROMPT_MID], max_new_tokens=10, eos_token_id=[])  # warm the (16, 16) bucket
    before = generation._generate_program._cache_size()
    for length, new in [(5, 10), (7, 12), (9, 9), (11, 14)]:
        out = model.generate([random_ids(1, length, seed=length)[0].tolist()], max_new_tokens=new, eos_token_id=[])
        assert out.shape == (1, length + new)
    assert generation._generate_program._cache_size() == before


def test_runs_under_bfloat16(causal_pair, tmp_path):
    reference, _ = causal_pair
    reference.save_pretrained(tmp_path)
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert model.generate([PROMPT_LONG], max_new_tokens=5).shape == (1, 16)
    assert model(np.array([PROMPT_LONG]), use_cache=True).past_key_values.layers[0].k.dtype == jnp.bfloat16


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(input_ids=[[]]), "prompt 0 is empty"),
        (
            dict(input_ids=[[5] * 100], max_new_tokens=29),
            r"100-token prompt plus 29 new tokens exceeds max_position_embeddings \(128\)",
        ),
        (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(do_sample=True, top_k=-1), "top_k must be a non-negative integer"),
        (dict(do_sample=True, min_p=1.2), r"min_p must be in \[0, 1\]"),
        (dict(num_return_sequences=2), "pass do_sample=True"),
        (dict(input_ids=[[5, 999]]), "token id 999 outside the vocabulary"),
        (dict(max_length=3), "leaves no room"),
        (dict(max_new_token=5), r"unknown argument\(s\) max_new_token"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0, got -1"),
    ],
)
def test_bad_generation_arguments(causal_pair, kwargs, message):
    _, model = causal_pair
    kwargs = {"input_ids": [[5, 6, 7]], **kwargs}
    with pytest.raises(GenerationError, match=message):
        model.generate(**kwargs)


def test_a_generation_config_is_the_keyword_arguments(causal_pair):
    _, model = causal_pair
    config = ej.GenerationConfig(max_new_tokens=7, do_sample=True, top_k=5, seed=4, eos_token_id=[])
    expected = model.generate([PROMPT_MID], max_new_tokens=7, do_sample=True, top_k=5, seed=4, eos_token_id=[])
    np.testing.assert_array_equal(model.generate([PROMPT_MID], generation_config=config), expected)
    assert model.generate([PROMPT_MID], generation_config=config, max_new_tokens=3).shape == (1, len(PROMPT_MID) + 3)


def test_untrained_config_defaults():
    model = ej.ModernBertDecoderForCausalLM(ej.ModernBertDecoderConfig(**TINY))
    out = model.generate(np.array([[1, 5, 6]]))  # eos 2 and pad 0 from the config; 20 new tokens at most
    assert out.shape[0] == 1 and 3 < out.shape[1] <= 23
    assert jax.tree.leaves(out)
