"""The losses, once: the model's `labels=` loss and the train steps both use `row_losses`.

Every loss is a per-row (sum, count) pair, so that the mean over a batch is
sum(sums) / sum(counts): transformers' loss for every task, and, summed over packed rows and
accumulated micro-batches, still the loss of the whole batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ettin_jax.config import PROBLEM_TYPES, ModernBertDecoderConfig
from ettin_jax.inputs import InputError, as_array, concrete

Array = jax.Array
IGNORE_INDEX = -100  # a label that counts for nothing, as in PyTorch
TASKS = ("causal_lm", *PROBLEM_TYPES)


def row_losses(task: str, logits: Array, labels: Array) -> tuple[Array, Array]:
    """Per-row loss sums and item counts, both (B,) float32. For "causal_lm", logits (B, T, V)
    and labels (B, T), position t predicting labels[t + 1]; for a classifier, logits (B, L)."""
    logits = logits.astype(jnp.float32)
    if task == "causal_lm":
        # The labels move left rather than the logits: slicing (B, T, V) logits would cost a
        # copy forward and a padded copy of their gradient backward.
        targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
        keep = targets != IGNORE_INDEX
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, targets, 0))
        return jnp.sum(ce * keep, axis=1), jnp.sum(keep, axis=1).astype(jnp.float32)
    if task == "single_label_classification":  # labels (B,)
        labels = labels.reshape(-1)
        keep = labels != IGNORE_INDEX
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, labels, 0))
        return ce * keep, keep.astype(jnp.float32)
    if task == "multi_label_classification":  # labels (B, L) in {0, 1}
        bce = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32))
        return jnp.sum(bce, axis=1), jnp.full(bce.shape[:1], bce.shape[1], jnp.float32)
    if task == "regression":  # labels (B, L) or (B,)
        err = (logits.reshape(logits.shape[0], -1) - labels.reshape(labels.shape[0], -1).astype(jnp.float32)) ** 2
        return jnp.sum(err, axis=1), jnp.full(err.shape[:1], err.shape[1], jnp.float32)
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def mean_loss(task: str, logits: Array, labels: Array) -> Array:
    """The batch's mean loss; with every label ignored, 0 (PyTorch: NaN)."""
    sums, counts = row_losses(task, logits, labels)
    return jnp.sum(sums) / jnp.maximum(jnp.sum(counts), 1.0)


# ---- the model's `labels=` loss, with its checks ------------------------------------------------
def causal_lm_loss(logits: Array, labels: Any) -> Array:
    """Next-token cross-entropy over labels that are not -100, as transformers computes it."""
    labels = as_array(labels)
    if labels.shape != logits.shape[:2] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise InputError(
            f"labels must be integers of shape {tuple(logits.shape[:2])} like input_ids, "
            f"got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    _check_label_range(labels, logits.shape[-1], "token id")
    return mean_loss("causal_lm", logits, labels)


def problem_type(config: ModernBertDecoderConfig, labels: Any) -> str:
    """config.problem_type, or transformers' guess from num_labels and the labels' dtype."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
        return "single_label_classification"
    return "multi_label_classification"


def classification_loss(config: ModernBertDecoderConfig, logits: Array, labels: Any) -> Array:
    """MSE, cross-entropy (labels -100 ignored) or BCE-with-logits by problem type; logits (B, L)."""
    labels = as_array(labels)
    batch, num_labels = logits.shape
    kind = problem_type(config, labels)
    if kind == "regression":
        _check_label_shape(labels, {(batch,), (batch, 1)} if num_labels == 1 else {(batch, num_labels)}, kind)
    elif kind == "single_label_classification":
        _check_label_shape(labels, {(batch,), (batch, 1)}, kind)
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise InputError(f"{kind} needs integer labels, got {labels.dtype}")
        _check_label_range(labels, num_labels, "class")
    else:
        _check_label_shape(labels, {(batch, num_labels)}, kind)
    return mean_loss(kind, logits, labels)


def _check_label_range(labels: Array, limit: int, what: str) -> None:
    values = concrete(labels)
    if values is not None:
        bad = (values != IGNORE_INDEX) & ((values < 0) | (values >= limit))
        if bad.any():
            raise InputError(f"label {values[bad][0]} is not a valid {what} in [0, {limit}) (nor -100, ignored)")


def _check_label_shape(labels: Array, expected: set[tuple[int, ...]], kind: str) -> None:
    if tuple(labels.shape) not in expected:
        raise InputError(
            f"{kind} labels must have shape {' or '.join(str(e) for e in sorted(expected))}, got {tuple(labels.shape)}"
        )
