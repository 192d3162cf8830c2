"""Evaluation metrics for fine-tuning, in plain numpy, and a plot of a run's metrics.jsonl.

Classification F1 scores follow `sklearn.metrics.f1_score(..., labels=range(L), zero_division=0)`:
a class's F1 is `2 tp / (2 tp + fp + fn)`, and 0 when that denominator is 0 (a class that is neither
predicted nor present). Macro F1 is the unweighted mean over all L classes, including such classes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ettin_jax.config import PROBLEM_TYPES
from ettin_jax.files import write_atomically

LOWER_IS_BETTER = ("loss", "mse", "perplexity")
HIGHER_IS_BETTER = ("accuracy", "exact_match", "pearson", "f1")  # "f1": any name that contains it
EVAL_PREFIX = "eval_"


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Element-wise F1 = 2tp / (2tp + fp + fn), 0 where the denominator is 0 (zero_division=0)."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)


def _as_int_labels(labels: np.ndarray, problem: str) -> np.ndarray:
    """Labels as int64, or a ValueError if they are not whole numbers."""
    if np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_:
        return labels.astype(np.int64)
    if np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
        return labels.astype(np.int64)
    raise ValueError(f"{problem}: labels must be whole numbers, got dtype {labels.dtype}")


def _check_label_names(label_names: Sequence[str] | None, num_labels: int, problem: str) -> None:
    if label_names is not None and len(label_names) != num_labels:
        raise ValueError(f"{problem}: got {len(label_names)} label_names for {num_labels} labels")


def _single_label(logits: np.ndarray, labels: np.ndarray, label_names: Sequence[str] | None) -> dict[str, float]:
    problem = "single_label_classification"
    if logits.ndim != 2 or labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{problem}: expected logits (N, L) and labels (N,), got {logits.shape} and {labels.shape}")
    num_labels = logits.shape[1]
    _check_label_names(label_names, num_labels, problem)
    labels = _as_int_labels(labels, problem)
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(f"{problem}: labels must lie in [0, {num_labels}), got {labels.min()}..{labels.max()}")
    preds = np.argmax(logits, axis=-1)
    correct = preds == labels
    tp = np.bincount(labels[correct], minlength=num_labels)
    fp = np.bincount(preds[~correct], minlength=num_labels)
    fn = np.bincount(labels[~correct], minlength=num_labels)
    return {"accuracy": float(np.mean(correct)), "macro_f1": float(np.mean(_f1(tp, fp, fn)))}


def _multi_label(
    logits: np.ndarray, labels: np.ndarray, label_names: Sequence[str] | None, threshold: float
) -> dict[str, float]:
    problem = "multi_label_classification"
    if logits.ndim != 2 or labels.shape != logits.shape:
        raise ValueError(
            f"{problem}: expected logits and labels of the same shape (N, L), got {logits.shape} and {labels.shape}"
        )
    num_labels = logits.shape[1]
    _check_label_names(label_names, num_labels, problem)
    labels = _as_int_labels(labels, problem)
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError(f"{problem}: labels must be 0 or 1")
    # sigmoid(x) > t exactly where x > log(t / (1 - t)): no sigmoid to saturate, and at t = 0.5 the
    # cut is 0.0 exactly.
    preds = logits.astype(np.float64) > math.log(threshold) - math.log1p(-threshold)
    truth = labels == 1
    tp = np.sum(preds & truth, axis=0)
    fp = np.sum(preds & ~truth, axis=0)
    fn = np.sum(~preds & truth, axis=0)
    per_label = _f1(tp, fp, fn)
    out = {
        "exact_match": float(np.mean(np.all(preds == truth, axis=1))),
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "macro_f1": float(np.mean(per_label)),
    }
    names = [str(n) for n in label_names] if label_names is not None else [str(i) for i in range(num_labels)]
    for name, value in zip(names, per_label, strict=True):
        out[f"f1_{name}"] = float(value)
    return out


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two flat arrays; nan if either is constant (zero variance)."""
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(np.dot(xc, xc)) * float(np.dot(yc, yc)))
    if denom == 0.0:
        return float("nan")
    return float(np.clip(np.dot(xc, yc) / denom, -1.0, 1.0))


def _regression(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    problem = "regression"
    if (
        logits.ndim not in (1, 2)
        or labels.ndim not in (1, 2)
        or logits.shape[0] != labels.shape[0]
        or logits.size != labels.size
    ):
        raise ValueError(
            f"{problem}: expected logits (N,), (N, 1) or (N, K) and labels with as many values per row, "
            f"got {logits.shape} and {labels.shape}"
        )
    x = logits.astype(np.float64).reshape(-1)
    y = labels.astype(np.float64).reshape(-1)
    return {"mse": float(np.mean((x - y) ** 2)), "pearson": _pearson(x, y)}


def classification_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    problem_type: str,
    label_names: Sequence[str] | None = None,
    *,
    threshold: float = 0.5,
) -> dict[str, float]:
    """Metrics of a sequence-classification head over a whole evaluation set.

    - "single_label_classification": logits (N, L), integer labels (N,) -> {"accuracy", "macro_f1"}.
    - "multi_label_classification": logits (N, L), 0/1 labels (N, L), a label predicted where
      sigmoid(logit) > `threshold` (0.5: logit > 0) -> {"exact_match", "micro_f1", "macro_f1",
      "f1_<name>" per label} (names from `label_names`, else indices). Other problem types ignore
      `threshold`.
    - "regression": logits (N,), (N, 1) or (N, K), labels with the same values per row -> {"mse", "pearson"};
      pearson is over the flattened values and is nan when either side is constant (zero variance).

    Raises ValueError for an unknown problem_type, mismatched shapes, labels out of range, an empty
    set, or a threshold outside (0, 1).
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"unknown problem_type {problem_type!r}; expected one of {', '.join(PROBLEM_TYPES)}")
    if logits.ndim == 0 or logits.shape[0] == 0:
        raise ValueError(f"{problem_type}: no examples to evaluate (logits shape {logits.shape})")
    if problem_type == "single_label_classification":
        return _single_label(logits, labels, label_names)
    if problem_type == "multi_label_classification":
        return _multi_label(logits, labels, label_names, threshold)
    return _regression(logits, labels)


def lm_metrics(loss_sum: float, token_count: int) -> dict[str, float]:
    """Mean token loss and perplexity exp(mean); perplexity is inf when exp overflows."""
    if token_count <= 0:
        raise ValueError(f"lm_metrics: token_count must be positive, got {token_count}")
    loss = float(loss_sum) / token_count
    try:
        perplexity = math.exp(loss)
    except OverflowError:
        perplexity = math.inf
    return {"loss": loss, "perplexity": perplexity}


def greater_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` (optionally prefixed "eval_") is better; ValueError if unknown."""
    name = metric.removeprefix(EVAL_PREFIX)
    if name in LOWER_IS_BETTER:
        return False
    if name in HIGHER_IS_BETTER or "f1" in name:
        return True
    raise ValueError(
        f"unknown metric {metric!r}; known: {', '.join(LOWER_IS_BETTER)} (lower is better), "
        f"accuracy, exact_match, pearson and any name containing 'f1' (higher is better), optionally prefixed 'eval_'"
    )


# What `evaluate` reports for each problem type (each name prefixed "eval_"); multi-label adds
# "f1_<label>" for each label.
EVAL_METRICS = {
    "causal_lm": ("loss", "perplexity"),
    "single_label_classification": ("loss", "accuracy", "macro_f1"),
    "multi_label_classification": ("loss", "exact_match", "micro_f1", "macro_f1"),
    "regression": ("loss", "mse", "pearson"),
}


def eval_metric_names(problem_type: str, label_names: Sequence[str] | None = None) -> list[str]:
    """The eval metrics a run of `problem_type` ("causal_lm" or a classification problem type)
    reports, prefixed "eval_"; for multi-label with `label_names`, one f1 per label too."""
    names = list(EVAL_METRICS[problem_type])
    if problem_type == "multi_label_classification":
        names += [f"f1_{n}" for n in label_names] if label_names is not None else ["f1_<label>"]
    return [EVAL_PREFIX + n for n in names]


def check_metric(metric: str, problem_type: str | None, label_names: Sequence[str] | None = None) -> None:
    """ValueError, naming the valid choices, unless evaluation of `problem_type` reports `metric`
    (with or without its "eval_" prefix). problem_type None: any classification problem type;
    multi-label without `label_names`: any "eval_f1_<label>" as well."""
    name = metric if metric.startswith(EVAL_PREFIX) else EVAL_PREFIX + metric
    problems = [p for p in EVAL_METRICS if p != "causal_lm"] if problem_type is None else [problem_type]
    for problem in problems:
        if problem not in EVAL_METRICS:
            raise ValueError(f"unknown problem_type {problem!r}; expected one of {', '.join(EVAL_METRICS)}")
        valid = eval_metric_names(problem, label_names)
        any_f1 = problem == "multi_label_classification" and label_names is None
        if name in valid or (any_f1 and name.startswith(EVAL_PREFIX + "f1_") and len(name) > len(EVAL_PREFIX + "f1_")):
            return
    choices = "; ".join(f"{p}: {', '.join(eval_metric_names(p, label_names))}" for p in problems)
    raise ValueError(f"unknown metric {metric!r}; the evaluation reports {choices}")


def is_better(metric: str, new: float, old: float | None) -> bool:
    """Whether `new` improves on `old` for `metric`: NaN is never better; anything else beats None or NaN."""
    higher = greater_is_better(metric)
    if new is None or math.isnan(new):
        return False
    if old is None or math.isnan(old):
        return True
    return new > old if higher else new < old


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics.jsonl file, skipping blank lines and a truncated (unparsable) last line.

    A bad line anywhere else raises ValueError with its line number.
    """
    with open(path, "rb") as f:
        lines = [(i + 1, line) for i, line in enumerate(f.read().split(b"\n")) if line.strip()]
    records: list[dict] = []
    for k, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            if k == len(lines) - 1:
                break  # the last write was cut short
            raise ValueError(f"{path}:{lineno}: not a metrics record: {e}") from e
        records.append(record)
    return records


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of every record that has a numeric `key`, sorted by step."""
    points = sorted((float(r["step"]), float(r[key])) for r in records if _is_number(r.get(key)))
    return [s for s, _ in points], [v for _, v in points]


def plot_metrics(records: list[dict], path: str) -> None:
    """Write a PNG of training loss and eval metrics against step, atomically.

    Left panel: training "loss" and "eval_loss"; right panel (only if there are any): every other "eval_*" metric.
    """
    for i, record in enumerate(records):
        if not _is_number(record.get("step")):
            raise ValueError(f"plot_metrics: record {i} has no numeric 'step': {record}")
    train = [r for r in records if not any(k.startswith(EVAL_PREFIX) for k in r)]
    evals = [r for r in records if any(k.startswith(EVAL_PREFIX) for k in r)]
    other = sorted(
        {k for r in evals for k, v in r.items() if k.startswith(EVAL_PREFIX) and k != "eval_loss" and _is_number(v)}
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if other else 1, figsize=(12 if other else 6, 4.5), squeeze=False)
    try:
        ax = axes[0, 0]
        for series, label, style in (
            (_series(train, "loss"), "train loss", "-"),
            (_series(evals, "eval_loss"), "eval loss", "o-"),
        ):
            if series[0]:
                ax.plot(*series, style, label=label, markersize=3)
        ax.set_title("Loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if ax.lines:
            ax.legend()
        if other:
            ax = axes[0, 1]
            for key in other:
                ax.plot(*_series(evals, key), "o-", label=key, markersize=3)
            ax.set_title("Eval metrics")
            ax.set_xlabel("step")
            ax.set_ylabel("value")
            ax.legend()
        fig.tight_layout()

        write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
