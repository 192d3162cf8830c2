"""The losses, once: the model's `labels=` loss and the train steps both use `row_losses`.

Every loss is a per-row (sum, count) pair, so that the mean over a batch is
sum(sums) / sum(counts): transformers' loss for every task, and, summed over packed rows and
accumulated micro-batches, still the loss of the whole batch.

Two options of the train steps, each PyTorch's own definition (transformers' Trainer has no
class weights; its users pass `weight=` to a `CrossEntropyLoss` of their own):
- `class_weights` (L,): single-label, `CrossEntropyLoss(weight=w)`, whose mean is
  sum(w_y ce) / sum(w_y): each row's sum is w_y ce and its count w_y. Multi-label,
  `BCEWithLogitsLoss(pos_weight=w)`: label c's positive term weighs w_c, its negative term 1,
  and the mean stays over all B x L terms (w_c = negatives / positives balances label c).
- `label_smoothing` eps: `CrossEntropyLoss(label_smoothing=eps)`, each item's loss
  (1 - eps) ce + eps mean_c(-log p_c), with class weights (1 - eps) w_y ce + eps/C sum_c w_c (-log p_c)
  over the same count w_y, as PyTorch weighs the smoothing term too. For the causal LM it is
  transformers' `LabelSmoother` (`--label_smoothing_factor`, which the Trainer applies to causal
  LMs with shifted labels), the same formula over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ettin_jax.config import PROBLEM_TYPES, ModernBertDecoderConfig
from ettin_jax.inputs import InputError, as_array, concrete

Array = jax.Array
IGNORE_INDEX = -100  # a label that counts for nothing, as in PyTorch
TASKS = ("causal_lm", *PROBLEM_TYPES)


def row_losses(
    task: str,
    logits: Array,
    labels: Array,
    *,
    class_weights: Array | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Array, Array]:
    """Per-row loss sums and item counts, both (B,) float32. For "causal_lm", logits (B, T, V)
    and labels (B, T), position t predicting labels[t + 1]; for a classifier, logits (B, L).

    `class_weights` (L,): single-label and multi-label classification only; `label_smoothing`
    in [0, 1): causal LM and single-label classification only (the module's docstring has both
    definitions). Left at their defaults, the program is the plain loss's."""
    _check_options(task, logits, class_weights, label_smoothing)
    logits = logits.astype(jnp.float32)
    if task == "causal_lm":
        # The labels move left rather than the logits: slicing (B, T, V) logits would cost a
        # copy forward and a padded copy of their gradient backward.
        targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
        keep = targets != IGNORE_INDEX
        if label_smoothing:
            losses, counts = _cross_entropy(logits, targets, keep, None, label_smoothing)
            return jnp.sum(losses, axis=1), jnp.sum(counts, axis=1)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, targets, 0))
        return jnp.sum(ce * keep, axis=1), jnp.sum(keep, axis=1).astype(jnp.float32)
    if task == "single_label_classification":  # labels (B,)
        labels = labels.reshape(-1)
        keep = labels != IGNORE_INDEX
        if class_weights is not None or label_smoothing:
            return _cross_entropy(logits, labels, keep, class_weights, label_smoothing)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, labels, 0))
        return ce * keep, keep.astype(jnp.float32)
    if task == "multi_label_classification":  # labels (B, L) in {0, 1}
        labels = labels.astype(jnp.float32)
        if class_weights is None:
            bce = optax.sigmoid_binary_cross_entropy(logits, labels)
        else:  # BCEWithLogitsLoss(pos_weight=w): -w y log sigmoid(x) - (1 - y) log sigmoid(-x)
            pos_weight = jnp.asarray(class_weights, jnp.float32)
            bce = pos_weight * labels * jax.nn.softplus(-logits) + (1 - labels) * jax.nn.softplus(logits)
        return jnp.sum(bce, axis=1), jnp.full(bce.shape[:1], bce.shape[1], jnp.float32)
    if task == "regression":  # labels (B, L) or (B,)
        err = (logits.reshape(logits.shape[0], -1) - labels.reshape(labels.shape[0], -1).astype(jnp.float32)) ** 2
        return jnp.sum(err, axis=1), jnp.full(err.shape[:1], err.shape[1], jnp.float32)
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def _cross_entropy(
    logits: Array, targets: Array, keep: Array, class_weights: Array | None, label_smoothing: float
) -> tuple[Array, Array]:
    """torch's `CrossEntropyLoss(weight=, label_smoothing=, reduction="none")` of each item and its
    weight in the mean (w_y, or 1), both 0 where `keep` is False. logits (..., C), targets (...)."""
    safe = jnp.where(keep, targets, 0)
    if label_smoothing:  # one log-sum-exp over the (..., C) logits for both terms
        lse = jax.nn.logsumexp(logits, axis=-1)
        ce = lse - jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    else:
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)  # (...,)
    if class_weights is None:
        weight = keep.astype(jnp.float32)
    else:
        class_weights = jnp.asarray(class_weights, jnp.float32)
        weight = jnp.where(keep, class_weights[safe], 0.0)
    loss = ce * weight
    if label_smoothing:
        # -log p_c = lse - x_c, summed over the classes without a (..., C) array of log-probs.
        if class_weights is None:
            smooth = lse - jnp.mean(logits, axis=-1)  # mean_c(-log p_c)
        else:
            weighted = lse * jnp.sum(class_weights) - jnp.sum(logits * class_weights, axis=-1)
            smooth = weighted / logits.shape[-1]  # 1/C sum_c w_c (-log p_c)
        loss = (1 - label_smoothing) * loss + label_smoothing * jnp.where(keep, smooth, 0.0)
    return loss, weight


def _check_options(task: str, logits: Array, class_weights: Array | None, label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    if label_smoothing and task not in ("causal_lm", "single_label_classification"):
        raise ValueError(f"label smoothing applies to causal_lm and single_label_classification, not to {task}")
    if class_weights is None:
        return
    if task not in ("single_label_classification", "multi_label_classification"):
        raise ValueError(f"class weights apply to single- and multi-label classification, not to {task}")
    if tuple(jnp.shape(class_weights)) != (logits.shape[-1],):
        raise ValueError(
            f"class_weights must have shape ({logits.shape[-1]},), one per label, got {tuple(jnp.shape(class_weights))}"
        )
    values = concrete(class_weights)
    if values is not None and not (np.all(np.isfinite(values)) and np.all(values >= 0)):
        raise ValueError(f"class_weights must be finite and not negative, got {np.asarray(values).tolist()}")


def balanced_class_weights(labels: Any, problem_type: str, label_names: Sequence[str]) -> np.ndarray:
    """ "Auto" class weights (L,) float32 from the training labels, for `row_losses`.

    Single-label: scikit-learn's "balanced", n_samples / (L * count_c) over the labels that are
    not -100, so that every class weighs the same in total. Multi-label: `pos_weight` c =
    negatives_c / positives_c, which PyTorch's `BCEWithLogitsLoss` documentation recommends, so
    that label c's positive and negative terms weigh the same in total. A ValueError names a
    class with no example (single-label), or a label never or always positive (multi-label),
    whose weight would be infinite or 0."""
    names = [str(n) for n in label_names]
    labels = np.asarray(labels)
    if problem_type == "single_label_classification":
        labels = labels.reshape(-1)
        labels = labels[labels != IGNORE_INDEX].astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise ValueError(f"labels must lie in [0, {len(names)}), got {labels.min()}..{labels.max()}")
        counts = np.bincount(labels, minlength=len(names))
        missing = [n for n, c in zip(names, counts, strict=True) if c == 0]
        if missing:
            raise ValueError(
                f"balanced class weights need an example of every class; the training labels have none of "
                f"{', '.join(repr(n) for n in missing)}"
            )
        return (labels.size / (len(names) * counts)).astype(np.float32)
    if problem_type == "multi_label_classification":
        if labels.ndim != 2 or labels.shape[1] != len(names):
            raise ValueError(f"multi-label labels must have shape (N, {len(names)}), got {labels.shape}")
        positives = np.sum(labels, axis=0, dtype=np.float64)  # soft labels count by their value
        negatives = labels.shape[0] - positives
        for what, counts in (("never", positives), ("always", negatives)):
            bad = [n for n, c in zip(names, counts, strict=True) if c == 0]
            if bad:
                raise ValueError(
                    f"balanced class weights need positive and negative examples of every label; "
                    f"{', '.join(repr(n) for n in bad)} {'is' if len(bad) == 1 else 'are'} {what} positive "
                    "in the training labels"
                )
        return (negatives / positives).astype(np.float32)
    raise ValueError(f"class weights apply to single- and multi-label classification, not to {problem_type}")


def mean_loss(
    task: str, logits: Array, labels: Array, *, class_weights: Array | None = None, label_smoothing: float = 0.0
) -> Array:
    """The batch's mean loss; with every label ignored (or weighing 0), 0 (PyTorch: NaN)."""
    sums, counts = row_losses(task, logits, labels, class_weights=class_weights, label_smoothing=label_smoothing)
    total = jnp.sum(counts)  # with class weights, possibly in (0, 1): no floor at 1
    return jnp.sum(sums) / jnp.where(total > 0, total, 1.0)


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
