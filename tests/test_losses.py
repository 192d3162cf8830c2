"""Class weights and label smoothing in `row_losses` against PyTorch's own losses and
transformers' LabelSmoother, on random logits with ignored labels; the balanced weights by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.trainer_pt_utils import LabelSmoother

from ettin_jax.losses import balanced_class_weights, mean_loss, row_losses

B, L = 7, 5
TOL = dict(rtol=1e-6, atol=1e-6)
WEIGHTS = np.array([0.3, 2.0, 0.05, 1.0, 4.0], np.float32)  # their sum over a batch can fall below 1


def _logits(*shape: int, seed: int = 0) -> np.ndarray:
    return (3 * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _single_labels() -> np.ndarray:
    labels = np.random.default_rng(1).integers(0, L, B).astype(np.int32)
    labels[[1, 4]] = -100
    return labels


def _t(x: np.ndarray) -> torch.Tensor:
    """float64 on the same float32 values: the reference without its own rounding."""
    return torch.tensor(x, dtype=torch.float64 if x.dtype.kind == "f" else torch.long)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.4])
def test_single_label_matches_cross_entropy_loss(weighted, smoothing):
    logits, labels = _logits(B, L), _single_labels()
    weights = WEIGHTS if weighted else None
    options = dict(class_weights=None if weights is None else jnp.asarray(weights), label_smoothing=smoothing)
    torch_options = dict(weight=None if weights is None else _t(weights), label_smoothing=smoothing)

    sums, counts = row_losses("single_label_classification", jnp.asarray(logits), jnp.asarray(labels), **options)
    per_item = torch.nn.CrossEntropyLoss(reduction="none", **torch_options)(_t(logits), _t(labels))
    np.testing.assert_allclose(np.asarray(sums), per_item.numpy(), **TOL)
    expected_counts = np.where(labels != -100, 1.0 if weights is None else weights[np.maximum(labels, 0)], 0.0)
    np.testing.assert_allclose(np.asarray(counts), expected_counts, **TOL)

    mean = torch.nn.CrossEntropyLoss(**torch_options)(_t(logits), _t(labels))
    ours = mean_loss("single_label_classification", jnp.asarray(logits), jnp.asarray(labels), **options)
    np.testing.assert_allclose(float(ours), float(mean), **TOL)


def test_weighted_mean_below_one_item():
    """One kept row of weight 0.05: the mean divides by 0.05, as PyTorch's does, not by 1."""
    logits = _logits(2, L)
    labels = np.array([2, -100], np.int32)
    ours = mean_loss("single_label_classification", jnp.asarray(logits), jnp.asarray(labels), class_weights=WEIGHTS)
    theirs = torch.nn.CrossEntropyLoss(weight=_t(WEIGHTS))(_t(logits), _t(labels))
    np.testing.assert_allclose(float(ours), float(theirs), **TOL)


@pytest.mark.parametrize("weighted", [False, True])
def test_multi_label_class_weights_are_pos_weight(weighted):
    logits = _logits(B, L)
    labels = np.random.default_rng(2).integers(0, 2, (B, L)).astype(np.float32)
    weights = WEIGHTS if weighted else None
    sums, counts = row_losses(
        "multi_label_classification", jnp.asarray(logits), jnp.asarray(labels), class_weights=weights
    )
    loss = torch.nn.BCEWithLogitsLoss(reduction="none", pos_weight=None if weights is None else _t(weights))
    per_term = loss(_t(logits), _t(labels))
    np.testing.assert_allclose(np.asarray(sums), per_term.sum(dim=1).numpy(), **TOL)
    np.testing.assert_array_equal(np.asarray(counts), np.full(B, L, np.float32))
    ours = mean_loss("multi_label_classification", jnp.asarray(logits), jnp.asarray(labels), class_weights=weights)
    np.testing.assert_allclose(float(ours), float(per_term.mean()), **TOL)


@pytest.mark.parametrize("smoothing", [0.1, 0.4])
def test_causal_lm_smoothing_is_transformers_label_smoother(smoothing):
    """The Trainer's `label_smoothing_factor` on a causal LM: LabelSmoother with shifted labels,
    which is also torch's CrossEntropyLoss(label_smoothing=) over the shifted tokens."""
    batch, length, vocab = 3, 9, 41
    logits = _logits(batch, length, vocab)
    labels = np.random.default_rng(3).integers(0, vocab, (batch, length)).astype(np.int32)
    labels[0, -3:] = -100  # a right-padded row
    labels[2, :4] = -100  # a prompt that is not trained on

    sums, counts = row_losses("causal_lm", jnp.asarray(logits), jnp.asarray(labels), label_smoothing=smoothing)
    smoother = LabelSmoother(epsilon=smoothing)
    theirs = smoother({"logits": _t(logits)}, _t(labels), shift_labels=True)
    np.testing.assert_allclose(float(jnp.sum(sums) / jnp.sum(counts)), float(theirs), **TOL)

    shifted = torch.nn.CrossEntropyLoss(reduction="none", label_smoothing=smoothing)(
        _t(logits[:, :-1]).reshape(-1, vocab), _t(labels[:, 1:]).reshape(-1)
    )
    np.testing.assert_allclose(np.asarray(sums), shifted.reshape(batch, -1).sum(dim=1).numpy(), **TOL)
    np.testing.assert_array_equal(np.asarray(counts), (labels[:, 1:] != -100).sum(axis=1))


@pytest.mark.parametrize("task", ["single_label_classification", "multi_label_classification", "causal_lm"])
def test_gradients_match_torch(task):
    """The gradient the train step takes, d mean / d logits, with both options where they apply."""
    rng = np.random.default_rng(4)
    if task == "causal_lm":
        logits, labels = _logits(2, 6, 11), rng.integers(0, 11, (2, 6)).astype(np.int32)
        labels[1, :2] = -100
        options, torch_loss = dict(label_smoothing=0.2), torch.nn.CrossEntropyLoss(label_smoothing=0.2)

        def theirs(x):
            return torch_loss(x[:, :-1].reshape(-1, 11), _t(labels[:, 1:]).reshape(-1))
    elif task == "single_label_classification":
        logits, labels = _logits(B, L), _single_labels()
        options = dict(class_weights=jnp.asarray(WEIGHTS), label_smoothing=0.2)
        torch_loss = torch.nn.CrossEntropyLoss(weight=_t(WEIGHTS), label_smoothing=0.2)

        def theirs(x):
            return torch_loss(x, _t(labels))
    else:
        logits, labels = _logits(B, L), rng.integers(0, 2, (B, L)).astype(np.float32)
        options, torch_loss = (
            dict(class_weights=jnp.asarray(WEIGHTS)),
            torch.nn.BCEWithLogitsLoss(pos_weight=_t(WEIGHTS)),
        )

        def theirs(x):
            return torch_loss(x, _t(labels))

    ours = jax.grad(lambda x: mean_loss(task, x, jnp.asarray(labels), **options))(jnp.asarray(logits))
    x = _t(logits).requires_grad_()
    theirs(x).backward()
    np.testing.assert_allclose(np.asarray(ours), x.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_defaults_and_neutral_options_agree():
    logits, labels = jnp.asarray(_logits(B, L)), jnp.asarray(_single_labels())
    plain = row_losses("single_label_classification", logits, labels)
    ones = row_losses("single_label_classification", logits, labels, class_weights=jnp.ones(L))
    for a, b in zip(plain, ones, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_options_under_jit():
    """Class weights as a traced argument (checked for shape only), smoothing as a static one."""
    logits, labels = jnp.asarray(_logits(B, L)), jnp.asarray(_single_labels())
    step = jax.jit(
        lambda w: mean_loss("single_label_classification", logits, labels, class_weights=w, label_smoothing=0.2)
    )
    theirs = torch.nn.CrossEntropyLoss(weight=_t(WEIGHTS), label_smoothing=0.2)(
        _t(np.asarray(logits)), _t(np.asarray(labels))
    )
    np.testing.assert_allclose(float(step(jnp.asarray(WEIGHTS))), float(theirs), **TOL)


@pytest.mark.parametrize(
    ("task", "options", "match"),
    [
        ("single_label_classification", dict(label_smoothing=1.0), r"\[0, 1\)"),
        ("single_label_classification", dict(label_smoothing=-0.1), r"\[0, 1\)"),
        ("multi_label_classification", dict(label_smoothing=0.1), "not to multi_label_classification"),
        ("regression", dict(label_smoothing=0.1), "not to regression"),
        ("regression", dict(class_weights=np.ones(L)), "not to regression"),
        ("causal_lm", dict(class_weights=np.ones(L)), "not to causal_lm"),
        ("single_label_classification", dict(class_weights=np.ones(L + 1)), r"shape \(5,\)"),
        ("single_label_classification", dict(class_weights=-np.ones(L)), "not negative"),
    ],
)
def test_bad_options(task, options, match):
    logits = jnp.zeros((2, 3, L)) if task == "causal_lm" else jnp.zeros((2, L))
    labels = jnp.zeros((2, 3) if task == "causal_lm" else (2,), jnp.int32)
    with pytest.raises(ValueError, match=match):
        row_losses(task, logits, labels, **options)


# ---- balanced ("auto") class weights ------------------------------------------------------------
def test_balanced_single_label_is_sklearn_balanced():
    labels = np.array([0, 0, 0, 0, 1, 2, 2, -100])  # 7 counted: 4, 1, 2
    weights = balanced_class_weights(labels, "single_label_classification", ["neg", "pos", "mixed"])
    np.testing.assert_allclose(weights, [7 / (3 * 4), 7 / (3 * 1), 7 / (3 * 2)], rtol=1e-6)
    assert weights.dtype == np.float32


def test_balanced_multi_label_is_negatives_over_positives():
    labels = np.array([[1, 0], [0, 1], [0, 1], [0, 1]])
    weights = balanced_class_weights(labels, "multi_label_classification", ["a", "b"])
    np.testing.assert_allclose(weights, [3 / 1, 1 / 3], rtol=1e-6)


@pytest.mark.parametrize(
    ("labels", "problem", "match"),
    [
        (np.array([0, 0, 2]), "single_label_classification", "none of 'pos'"),
        (np.array([0, 1, 2, 3]), "single_label_classification", r"\[0, 3\)"),
        (np.array([[1, 1, 1], [0, 1, 0]]), "multi_label_classification", "'pos' is always positive"),
        (np.array([[1, 0, 1], [0, 0, 0]]), "multi_label_classification", "'pos' is never positive"),
        (np.array([0.5, 1.0]), "regression", "not to regression"),
    ],
)
def test_balanced_errors_name_the_class(labels, problem, match):
    with pytest.raises(ValueError, match=match):
        balanced_class_weights(labels, problem, ["neg", "pos", "mixed"])
