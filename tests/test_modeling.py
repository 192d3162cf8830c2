"""Numerical parity with transformers' PyTorch ModernBertDecoder, float32, same random weights."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import TINY, WINDOW, random_ids, to_numpy

import ettin_jax as ej
from ettin_jax.attention import AttentionError, MaskSpec, dense_mask
from ettin_jax.losses import problem_type
from ettin_jax.modeling import LayerInputs, rope_tables

TOL = 1e-4
LENGTH = 3 * WINDOW + 5  # longer than twice the sliding window


def pad(ids: np.ndarray, side: str, amount: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Pads row 0 by `amount` tokens (pad id 0) on `side`; row 1 stays full."""
    ids = ids.copy()
    mask = np.ones_like(ids)
    if side == "left":
        ids[0, :amount], mask[0, :amount] = 0, 0
    elif side == "right":
        ids[0, -amount:], mask[0, -amount:] = 0, 0
    return ids, mask


def torch_logits(model, ids, mask=None, **kw):
    with torch.no_grad():
        out = model(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=None if mask is None else torch.tensor(mask),
            **kw,
        )
    return out


CASES = {
    "default": {},
    "layer_types": dict(layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]),
    "biases": dict(attention_bias=True, mlp_bias=True, norm_bias=True, classifier_bias=True),
    "untied": dict(tie_word_embeddings=False),
    "rope_thetas": dict(
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 5_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 300.0},
        }
    ),
    "tanh_gelu": dict(hidden_activation="gelu_pytorch_tanh", classifier_activation="silu"),
    "no_decoder_bias": dict(decoder_bias=False),
}


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_causal_lm_logits_match_transformers(saved, case, padding):
    torch_model, directory = saved("causal", **CASES[case])
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
    ids, mask = pad(random_ids(2, LENGTH), padding)
    expected = to_numpy(torch_logits(torch_model, ids, mask).logits)
    got = np.asarray(model(ids, attention_mask=mask).logits)
    real = mask.astype(bool)  # outputs at pad positions are meaningless in both frameworks
    assert got.shape == expected.shape
    assert np.abs(got - expected)[real].max() <= TOL


def test_hidden_states_and_loss_match(saved):
    torch_model, directory = saved("causal")
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
    ids = random_ids(2, LENGTH)
    labels = ids.copy()
    labels[0, :4] = -100
    ref = torch_logits(torch_model, ids, labels=torch.tensor(labels, dtype=torch.long), output_hidden_states=True)
    out = model(ids, labels=labels, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(ours), to_numpy(theirs), atol=TOL)
    assert abs(float(out.loss) - float(ref.loss)) <= 1e-5


def test_explicit_position_ids_match(saved):
    torch_model, directory = saved("causal")
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
    ids = random_ids(2, LENGTH)
    # A stride of 2 (a shift alone would cancel out in RoPE's relative angles).
    positions = np.broadcast_to(2 * np.arange(LENGTH) + 7, ids.shape).astype(np.int32)
    mask = np.ones_like(ids)
    expected = to_numpy(
        torch_logits(torch_model, ids, mask, position_ids=torch.tensor(positions, dtype=torch.long)).logits
    )
    got = np.asarray(model(ids.tolist(), attention_mask=mask, position_ids=positions).logits)  # lists work too
    np.testing.assert_allclose(got, expected, atol=TOL)
    assert np.abs(got - np.asarray(model(ids).logits)).max() > 1e-3  # the positions matter


def test_base_model_and_inputs_embeds(saved):
    torch_causal, directory = saved("causal")
    model = ej.ModernBertDecoderModel.from_pretrained(directory)
    ids = random_ids(2, LENGTH)
    embeds = torch_causal.model.embeddings.tok_embeddings(torch.tensor(ids, dtype=torch.long))
    with torch.no_grad():
        ref = torch_causal.model(inputs_embeds=embeds).last_hidden_state
    got = model(inputs_embeds=jnp.asarray(to_numpy(embeds))).last_hidden_state
    np.testing.assert_allclose(np.asarray(got), to_numpy(ref), atol=TOL)
    np.testing.assert_allclose(np.asarray(model(ids).last_hidden_state), to_numpy(ref), atol=TOL)


@pytest.mark.parametrize("layers", [3, 4], ids=["last-layer-sliding", "last-layer-global"])
def test_rows_are_the_full_run_at_those_tokens(saved, layers):
    """`rows` runs the last layer for a few tokens only (a classifier's pooling): the same states
    as the full run at those tokens, under padding, the sliding window and packed segments."""
    _, directory = saved("causal", num_hidden_layers=layers)
    model = ej.ModernBertDecoderModel.from_pretrained(directory)
    ids, mask = pad(random_ids(2, LENGTH), "left")
    segments = np.zeros_like(ids)
    segments[1, LENGTH // 2 :] = 1
    rows = np.array([[LENGTH - 1, 6, WINDOW + 7], [3, LENGTH // 2 + 1, LENGTH - 1]])
    full = model(ids, mask, segment_ids=segments).last_hidden_state
    got = model(ids, mask, segment_ids=segments, rows=jnp.asarray(rows)).last_hidden_state
    assert got.shape == (2, 3, model.config.hidden_size)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full)[np.arange(2)[:, None], rows], atol=1e-5)
    with pytest.raises(ej.InputError, match="rows and output_hidden_states exclude each other"):
        model(ids, rows=jnp.asarray(rows), output_hidden_states=True)


# ---- transformers' forward signature: cache, attentions, logits_to_keep -------------------------
@pytest.mark.parametrize("padding", ["none", "left"])
def test_a_cached_call_continues_the_sequence(saved, padding):
    """A call with `past_key_values` continues the earlier call: prefill, then one token, then
    several, equal to one full forward and to transformers' own cached calls (sliding layers
    wrap their ring of slots on the way)."""
    torch_model, directory = saved("causal")
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
    ids, mask = pad(random_ids(2, LENGTH), padding, amount=3)
    full = np.asarray(model(ids, attention_mask=mask).logits)
    cuts = [0, 7, 8, LENGTH]
    pieces, cache = [], None
    for a, b in itertools.pairwise(cuts):
        out = model(ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache, use_cache=True)
        pieces.append(np.asarray(out.logits))
        cache = out.past_key_values
    assert int(cache.length) == LENGTH
    real = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1)[real], full[real], atol=1e-5)
    with torch.no_grad():
        first = torch_model(torch.tensor(ids[:, :8]), attention_mask=torch.tensor(mask[:, :8]), use_cache=True)
        rest = torch_model(torch.tensor(ids[:, 8:]), attention_mask=torch.tensor(mask), cache=first.cache)
    np.testing.assert_allclose(pieces[-1], to_numpy(rest.logits), atol=TOL)


def test_attentions_match_transformers(saved):
    torch_model, directory = saved("causal")
    torch_model.config._attn_implementation = "eager"  # the implementation that returns them
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
    ids, mask = pad(random_ids(2, LENGTH), "right")
    ref = torch_logits(torch_model, ids, mask, output_attentions=True).attentions
    got = model(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(got) == len(ref) == model.config.num_hidden_layers
    for ours, theirs in zip(got, ref, strict=True):
        assert ours.shape == (2, model.config.num_attention_heads, LENGTH, LENGTH)
        np.testing.assert_allclose(np.asarray(ours)[1], to_numpy(theirs)[1], atol=1e-5)  # row 1 has no padding
        np.testing.assert_allclose(np.asarray(ours)[0, :, :-5], to_numpy(theirs)[0, :, :-5], atol=1e-5)
    model.set_attention_impl("xla_blocked")
    with pytest.raises(AttentionError, match='"xla_blocked" cannot return attention probabilities'):
        model(ids, output_attentions=True)


def test_logits_to_keep_matches_transformers(saved):
    torch_model, directory = saved("causal")
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
    ids = random_ids(2, LENGTH)
    expected = to_numpy(torch_logits(torch_model, ids, logits_to_keep=3).logits)
    got = model(ids, logits_to_keep=3)
    assert got.logits.shape == (2, 3, model.config.vocab_size)
    np.testing.assert_allclose(np.asarray(got.logits), expected, atol=TOL)
    with pytest.raises(ej.InputError, match="logits_to_keep must be an integer >= 0"):
        model(ids, logits_to_keep=-1)


def test_jit_matches_eager(saved):
    _, directory = saved("causal")
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
    ids = random_ids(2, LENGTH)
    jitted = nnx.jit(lambda m, x: m(x).logits)(model, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(model(ids).logits), atol=1e-6)


# ---- per module ---------------------------------------------------------------------------
@pytest.fixture
def pair(saved):
    torch_model, directory = saved("causal")
    torch_model.config._attn_implementation = "eager"  # takes our explicit additive mask
    return torch_model, ej.ModernBertDecoderForCausalLM.from_pretrained(directory)


def test_embeddings_match(pair):
    torch_model, model = pair
    ids = random_ids(2, LENGTH)
    with torch.no_grad():
        ref = torch_model.model.embeddings(input_ids=torch.tensor(ids, dtype=torch.long))
    got = model.model.embeddings(jnp.asarray(ids), None, True)
    np.testing.assert_allclose(np.asarray(got), to_numpy(ref), atol=1e-5)


@pytest.mark.parametrize("layer", [1, 3], ids=["sliding", "global"])
def test_decoder_layer_matches(pair, layer):
    torch_model, model = pair
    kind = model.config.layer_types[layer]
    assert kind == ("sliding_attention" if layer == 1 else "full_attention")
    hidden = np.random.default_rng(1).normal(size=(2, LENGTH, model.config.hidden_size)).astype(np.float32)
    positions = np.broadcast_to(np.arange(LENGTH), (2, LENGTH))
    valid = np.ones((2, LENGTH), bool)
    valid[0, :3] = False
    window = model.config.sliding_window if kind == "sliding_attention" else None
    spec = MaskSpec(index=jnp.asarray(positions), valid=jnp.asarray(valid))
    mask = dense_mask(spec, window)
    theta = model.config.rope_theta(layer)
    cos, sin = rope_tables(jnp.asarray(positions), model.config.head_dim, theta)
    with torch.no_grad():
        h = torch.tensor(hidden)
        tcos, tsin = torch_model.model.rotary_emb(h, torch.tensor(positions), kind)
        np.testing.assert_allclose(np.asarray(cos), to_numpy(tcos), atol=1e-6)
        additive = torch.where(torch.tensor(np.asarray(mask)), 0.0, torch.finfo(torch.float32).min)
        ref = torch_model.model.layers[layer](h, position_embeddings=(tcos, tsin), attention_mask=additive)
    got, _, _ = model.model.layers[layer](jnp.asarray(hidden), LayerInputs(cos, sin, spec), None)
    # Row 0's first three queries see no valid key: undefined in both frameworks.
    np.testing.assert_allclose(np.asarray(got)[valid], to_numpy(ref)[valid], atol=1e-5)


def test_sliding_window_sees_exactly_window_keys():
    positions = jnp.arange(10)[None]
    mask = np.asarray(dense_mask(MaskSpec(positions, jnp.ones((1, 10), bool)), 4))[0, 0]
    assert mask.sum(-1).tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    assert mask[9, 6] and not mask[9, 5] and not mask[5, 6]


def test_lm_head_matches(pair):
    torch_model, model = pair
    hidden = np.random.default_rng(2).normal(size=(2, 5, model.config.hidden_size)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model.decoder(torch_model.lm_head(torch.tensor(hidden)))
    np.testing.assert_allclose(np.asarray(model.logits(jnp.asarray(hidden))), to_numpy(ref), atol=1e-5)


# ---- sequence classification --------------------------------------------------------------
PROBLEMS = {
    "regression": (1, lambda rng: rng.normal(size=(3,)).astype(np.float32)),
    "single_label_classification": (3, lambda rng: rng.integers(0, 3, size=(3,)).astype(np.int32)),
    "multi_label_classification": (3, lambda rng: rng.integers(0, 2, size=(3, 3)).astype(np.float32)),
}


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_classifier_logits_and_loss_match(saved, problem):
    num_labels, make_labels = PROBLEMS[problem]
    torch_model, directory = saved("classify", num_labels=num_labels, problem_type=problem, classifier_bias=True)
    model = ej.ModernBertDecoderForSequenceClassification.from_pretrained(directory)
    assert model.config.problem_type == problem and model.config.num_labels == num_labels
    ids = random_ids(3, LENGTH)
    ids[0, :4] = 0  # left padding
    ids[1, -6:] = 0  # right padding
    mask = (ids != 0).astype(np.int32)
    labels = make_labels(np.random.default_rng(3))
    torch_labels = torch.tensor(labels, dtype=torch.long if labels.dtype == np.int32 else torch.float32)
    ref = torch_logits(torch_model, ids, mask, labels=torch_labels)
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (3, num_labels)
    np.testing.assert_allclose(np.asarray(out.logits), to_numpy(ref.logits), atol=TOL)
    assert abs(float(out.loss) - float(ref.loss)) <= 1e-5


@pytest.mark.parametrize(
    ("num_labels", "labels", "inferred"),
    [
        (1, np.array([0.5, -1.0, 2.0], np.float32), "regression"),
        (3, np.array([1, -100, 2], np.int32), "single_label_classification"),  # -100 is ignored
        (3, np.array([[1, 0, 1], [0, 0, 1], [1, 1, 1]], np.float32), "multi_label_classification"),
    ],
)
def test_classifier_problem_type_inferred_like_transformers(saved, num_labels, labels, inferred):
    torch_model, directory = saved("classify", num_labels=num_labels)
    model = ej.ModernBertDecoderForSequenceClassification.from_pretrained(directory)
    assert model.config.problem_type is None
    ids = random_ids(3, LENGTH)
    torch_labels = torch.tensor(labels, dtype=torch.long if labels.dtype == np.int32 else torch.float32)
    ref = torch_logits(torch_model, ids, labels=torch_labels)
    assert torch_model.config.problem_type == inferred
    assert problem_type(model.config, labels) == inferred
    assert abs(float(model(ids, labels=labels).loss) - float(ref.loss)) <= 1e-5


def test_classifier_head_matches(saved):
    torch_model, directory = saved("classify", num_labels=4)
    model = ej.ModernBertDecoderForSequenceClassification.from_pretrained(directory)
    hidden = np.random.default_rng(4).normal(size=(2, 5, model.config.hidden_size)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model.classifier(torch_model.head(torch.tensor(hidden)))
    got = model.classifier(model.head(jnp.asarray(hidden)))
    np.testing.assert_allclose(np.asarray(got), to_numpy(ref), atol=1e-5)


# ---- dtypes and dropout -------------------------------------------------------------------
# bfloat16 rounds to 8 significant bits: a relative error of up to 2**-9 per rounding. The
# logits of this 4-layer model pass through about 20 roundings (projections, attention, MLP,
# norms, head); errors of random sign grow like sqrt(20) * 2**-9 ~ 0.9% of the logit scale
# (0.85% measured). The bound is about twice that. float16 keeps 11 bits: 8x tighter.
@pytest.mark.parametrize(
    ("dtype", "param_dtype", "rel"),
    [
        (jnp.bfloat16, jnp.float32, 0.02),
        (jnp.bfloat16, jnp.bfloat16, 0.02),
        (jnp.float16, jnp.float16, 0.02 / 8),
    ],
)
def test_low_precision_close_to_float32_reference(saved, dtype, param_dtype, rel):
    torch_model, directory = saved("causal")
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory, dtype=dtype, param_dtype=param_dtype)
    assert model.decoder.bias.dtype == param_dtype
    ids = random_ids(2, LENGTH)
    expected = to_numpy(torch_logits(torch_model, ids).logits)
    logits = model(ids).logits
    assert logits.dtype == dtype
    got = np.asarray(logits.astype(jnp.float32))
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= rel * scale
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.97


def test_dropout_active_only_when_not_deterministic(saved):
    drops = dict(embedding_dropout=0.1, attention_dropout=0.1, mlp_dropout=0.1)
    torch_model, directory = saved("causal", **drops)
    model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
    ids = random_ids(2, LENGTH)
    eval_logits = np.asarray(model(ids).logits)
    np.testing.assert_allclose(eval_logits, to_numpy(torch_logits(torch_model, ids).logits), atol=TOL)
    first = np.asarray(model(ids, deterministic=False).logits)
    second = np.asarray(model(ids, deterministic=False).logits)
    assert np.abs(first - eval_logits).max() > 1e-3
    assert np.abs(first - second).max() > 1e-3  # the RNG stream advances between calls


# ---- bad input ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model():
    config = ej.ModernBertDecoderConfig(**{k: v for k, v in TINY.items()})
    return ej.ModernBertDecoderForCausalLM(config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(input_ids=np.array([[5, 128]])), r"input_ids\[0, 1\] = 128 is outside the vocabulary"),
        (dict(input_ids=np.array([[5, -1]])), r"input_ids\[0, 1\] = -1 is outside"),
        (dict(input_ids=np.ones((1, 129), np.int32)), "longer than max_position_embeddings"),
        (dict(input_ids=np.ones((1, 0), np.int32)), "empty"),
        (dict(input_ids=np.ones((3,), np.int32)), "shape"),
        (dict(input_ids=np.ones((1, 4), np.float32)), "integers"),
        (dict(), "exactly one of input_ids and inputs_embeds"),
        (dict(input_ids=np.ones((2, 4), np.int32), attention_mask=np.ones((2, 5))), "attention_mask has shape"),
        (dict(input_ids=np.ones((1, 4), np.int32), position_ids=np.array([[0, 1, 2, 500]])), "position_ids"),
        (dict(inputs_embeds=np.ones((1, 4, 7), np.float32)), "inputs_embeds must have shape"),
    ],
)
def test_bad_inputs_name_the_problem(small_model, kwargs, message):
    with pytest.raises(ej.InputError, match=message):
        small_model(**kwargs)


@pytest.mark.parametrize(
    ("problem", "labels", "message"),
    [
        (None, np.array([0, 3]), r"label 3 is not a valid class in \[0, 3\)"),
        ("single_label_classification", np.array([0.0, 1.0]), "needs integer labels"),
        (None, np.array([[0.0, 1.0, 1.0]]), r"multi_label_classification labels must have shape \(2, 3\)"),
        ("regression", np.array([0.5, 1.0]), r"regression labels must have shape \(2, 3\)"),
    ],
)
def test_bad_classification_labels(problem, labels, message):
    config = ej.ModernBertDecoderConfig(**TINY).replace(num_labels=3, problem_type=problem)
    with pytest.raises(ej.InputError, match=message):
        ej.ModernBertDecoderForSequenceClassification(config)(np.array([[5, 6], [7, 8]]), labels=labels)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.ones((2, 3), np.int32), r"labels must be integers of shape \(1, 4\)"),
        (np.array([[5, 6, 7, 200]]), "label 200"),
    ],
)
def test_bad_causal_lm_labels(small_model, labels, message):
    with pytest.raises(ej.InputError, match=message):
        small_model(np.array([[5, 6, 7, 8]]), labels=labels)


def test_classifier_without_pad_token_refuses_batches():
    model = ej.ModernBertDecoderForSequenceClassification(ej.ModernBertDecoderConfig(**{**TINY, "pad_token_id": None}))
    assert model(np.array([[5, 6]])).logits.shape == (1, 2)
    with pytest.raises(ej.InputError, match="pad_token_id is not set"):
        model(np.array([[5, 6], [7, 8]]))


def test_out_of_vocab_under_jit_is_nan_not_a_clamped_row(small_model):
    # Under jit the ids cannot be checked in Python; the bad row turns NaN, the good row is intact.
    ids = jnp.array([[5, 6], [5, 500]])
    logits = np.asarray(jax.jit(lambda ids: nnx.merge(*nnx.split(small_model))(ids).logits)(ids))
    np.testing.assert_allclose(logits[0], np.asarray(small_model(np.array([[5, 6]])).logits[0]), atol=1e-6)
    assert np.isnan(logits[1]).all()
