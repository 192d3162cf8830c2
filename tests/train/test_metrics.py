"""Evaluation metrics against hand-computed values, metrics.jsonl reading, and the metrics plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from ettin_jax.train.metrics import (
    classification_metrics,
    greater_is_better,
    is_better,
    lm_metrics,
    plot_metrics,
    read_metrics,
)


def one_hot_logits(preds: list[int], num_labels: int) -> np.ndarray:
    logits = np.full((len(preds), num_labels), -1.0, dtype=np.float32)
    logits[np.arange(len(preds)), preds] = 3.0
    return logits


# --- single-label classification ---------------------------------------------------------------


def test_single_label_accuracy_and_macro_f1_by_hand():
    # 5 classes. Class 2 occurs but is never predicted; class 3 neither occurs nor is predicted (0/0 -> 0);
    # class 4 is predicted but never occurs.
    labels = np.array([0, 0, 1, 1, 2, 0])
    preds = [0, 1, 1, 1, 0, 4]
    out = classification_metrics(one_hot_logits(preds, 5), labels, "single_label_classification")
    assert set(out) == {"accuracy", "macro_f1"}
    assert out["accuracy"] == pytest.approx(3 / 6)
    # class 0: tp=1 fp=1 fn=2 -> 2/5; class 1: tp=2 fp=1 fn=0 -> 4/5; classes 2, 3, 4 -> 0.
    assert out["macro_f1"] == pytest.approx((2 / 5 + 4 / 5) / 5)


def test_single_label_perfect_and_float_labels():
    out = classification_metrics(one_hot_logits([2, 0, 1], 3), np.array([2.0, 0.0, 1.0]), "single_label_classification")
    assert out == {"accuracy": 1.0, "macro_f1": 1.0}


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (np.zeros((3, 2)), np.zeros((4,), dtype=int), "single_label_classification"),
        (np.zeros((3,)), np.zeros((3,), dtype=int), "single_label_classification"),
        (np.zeros((3, 2)), np.array([0, 1, 2]), r"\[0, 2\)"),
        (np.zeros((3, 2)), np.array([0.5, 1, 0]), "whole numbers"),
        (np.zeros((0, 2)), np.zeros((0,), dtype=int), "no examples"),
    ],
)
def test_single_label_bad_inputs(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(logits, labels, "single_label_classification")


def test_unknown_problem_type():
    with pytest.raises(ValueError, match="token_classification"):
        classification_metrics(np.zeros((2, 2)), np.zeros(2, dtype=int), "token_classification")


# --- multi-label classification ----------------------------------------------------------------

MULTI_LABELS = np.array(
    [
        [1, 0, 1, 0],
        [0, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 0, 0],
    ]
)
# Predicted where logit > 0 (a logit of exactly 0 is a negative prediction):
# row 0 exact; row 1 misses b; row 2 adds c; row 3 exact. Label d is never true nor predicted.
MULTI_LOGITS = np.array(
    [
        [2.0, -1.0, 0.5, -3.0],
        [-2.0, 0.0, -1.0, -1.0],
        [1.0, 4.0, 0.1, -2.0],
        [-1.0, -1.0, 0.0, 0.0],
    ]
)


def test_multi_label_by_hand():
    out = classification_metrics(MULTI_LOGITS, MULTI_LABELS, "multi_label_classification", ["a", "b", "c", "d"])
    assert set(out) == {"exact_match", "micro_f1", "macro_f1", "f1_a", "f1_b", "f1_c", "f1_d"}
    assert out["exact_match"] == pytest.approx(2 / 4)
    assert out["f1_a"] == pytest.approx(1.0)  # tp=2 fp=0 fn=0
    assert out["f1_b"] == pytest.approx(2 / 3)  # tp=1 fp=0 fn=1
    assert out["f1_c"] == pytest.approx(2 / 3)  # tp=1 fp=1 fn=0
    assert out["f1_d"] == 0.0  # 0/0 -> 0
    assert out["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3 + 0) / 4)
    assert out["micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))  # tp=4 fp=1 fn=1


def test_multi_label_default_names_and_errors():
    out = classification_metrics(MULTI_LOGITS, MULTI_LABELS.astype(np.float32), "multi_label_classification")
    assert [k for k in out if k.startswith("f1_")] == ["f1_0", "f1_1", "f1_2", "f1_3"]
    assert out["f1_1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="multi_label_classification"):
        classification_metrics(MULTI_LOGITS, MULTI_LABELS[:, :3], "multi_label_classification")
    with pytest.raises(ValueError, match="label_names"):
        classification_metrics(MULTI_LOGITS, MULTI_LABELS, "multi_label_classification", ["a", "b"])
    with pytest.raises(ValueError, match="0 or 1"):
        classification_metrics(MULTI_LOGITS, MULTI_LABELS * 2, "multi_label_classification")


def test_multi_label_threshold_by_hand():
    # At 0.6 the cut is logit > log(1.5) = 0.405: row 2 no longer predicts c (0.1), and is exact.
    out = classification_metrics(MULTI_LOGITS, MULTI_LABELS, "multi_label_classification", threshold=0.6)
    assert out["exact_match"] == pytest.approx(3 / 4)
    assert out["f1_2"] == pytest.approx(1.0)  # c: tp=1 fp=0 fn=0


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.5, 0.75, 0.99])
def test_multi_label_threshold_is_on_the_sigmoid(threshold):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3, size=(64, 5)).astype(np.float32)
    labels = rng.integers(0, 2, (64, 5))
    preds = 1 / (1 + np.exp(-logits.astype(np.float64))) > threshold
    expected = classification_metrics(np.where(preds, 1.0, -1.0), labels, "multi_label_classification")
    out = classification_metrics(logits, labels, "multi_label_classification", threshold=threshold)
    assert out == expected


def test_multi_label_threshold_half_is_logit_zero():
    default = classification_metrics(MULTI_LOGITS, MULTI_LABELS, "multi_label_classification")
    assert classification_metrics(MULTI_LOGITS, MULTI_LABELS, "multi_label_classification", threshold=0.5) == default


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_threshold_outside_zero_one(threshold):
    with pytest.raises(ValueError, match="threshold"):
        classification_metrics(MULTI_LOGITS, MULTI_LABELS, "multi_label_classification", threshold=threshold)


# --- regression --------------------------------------------------------------------------------


def test_regression_mse_and_pearson():
    rng = np.random.default_rng(0)
    labels = rng.normal(size=20)
    preds = 0.7 * labels + rng.normal(scale=0.5, size=20)
    out = classification_metrics(preds[:, None].astype(np.float32), labels, "regression")
    assert set(out) == {"mse", "pearson"}
    assert out["mse"] == pytest.approx(np.mean((preds.astype(np.float32) - labels) ** 2), rel=1e-6)
    assert out["pearson"] == pytest.approx(np.corrcoef(preds.astype(np.float32), labels)[0, 1], rel=1e-6)
    assert 0.5 < out["pearson"] < 1.0


def test_regression_multi_output_flattens():
    rng = np.random.default_rng(1)
    labels, preds = rng.normal(size=(10, 3)), rng.normal(size=(10, 3))
    out = classification_metrics(preds, labels, "regression")
    assert out["mse"] == pytest.approx(np.mean((preds - labels) ** 2))
    assert out["pearson"] == pytest.approx(np.corrcoef(preds.ravel(), labels.ravel())[0, 1])


def test_regression_constant_gives_nan():
    labels = np.array([1.0, 2.0, 4.0])
    out = classification_metrics(np.full((3, 1), 0.1), labels, "regression")
    assert out["mse"] == pytest.approx(np.mean((0.1 - labels) ** 2))
    assert math.isnan(out["pearson"])
    assert math.isnan(classification_metrics(labels, np.full(3, 2.0), "regression")["pearson"])


def test_regression_shape_mismatch():
    with pytest.raises(ValueError, match="regression"):
        classification_metrics(np.zeros((4, 1)), np.zeros(3), "regression")
    with pytest.raises(ValueError, match="regression"):
        classification_metrics(np.zeros((4, 2)), np.zeros(4), "regression")


# --- language modelling ------------------------------------------------------------------------


def test_lm_metrics():
    out = lm_metrics(6.0, 3)
    assert out["loss"] == pytest.approx(2.0)
    assert out["perplexity"] == pytest.approx(math.exp(2.0))


def test_lm_metrics_overflow_is_inf_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = lm_metrics(1e6, 10)
    assert out["loss"] == pytest.approx(1e5)
    assert out["perplexity"] == math.inf


@pytest.mark.parametrize("count", [0, -1])
def test_lm_metrics_needs_tokens(count):
    with pytest.raises(ValueError, match="token_count"):
        lm_metrics(1.0, count)


# --- model selection ---------------------------------------------------------------------------


def test_greater_is_better():
    for name in ("loss", "eval_loss", "mse", "eval_perplexity"):
        assert greater_is_better(name) is False, name
    for name in ("accuracy", "eval_accuracy", "eval_macro_f1", "micro_f1", "f1_toxic", "exact_match", "eval_pearson"):
        assert greater_is_better(name) is True, name


def test_is_better():
    assert is_better("eval_loss", 0.5, 0.6)
    assert not is_better("eval_loss", 0.7, 0.6)
    assert not is_better("loss", 0.6, 0.6)  # ties are not improvements
    assert is_better("eval_accuracy", 0.7, 0.6)
    assert not is_better("accuracy", 0.5, 0.6)
    assert is_better("eval_macro_f1", 0.1, None)
    assert is_better("eval_loss", 10.0, float("nan"))
    assert not is_better("eval_loss", float("nan"), 0.6)
    assert not is_better("eval_accuracy", float("nan"), None)


def test_unknown_metric():
    with pytest.raises(ValueError, match="accuracy") as info:
        greater_is_better("eval_bleu")
    assert "eval_bleu" in str(info.value)
    with pytest.raises(ValueError, match="bleu"):
        is_better("bleu", 1.0, None)


# --- metrics.jsonl -----------------------------------------------------------------------------


def test_read_metrics_ignores_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 2.5}, {"step": 2, "eval_loss": 2.0, "eval_accuracy": 0.5}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + '{"step": 3, "lo')
    assert read_metrics(str(path)) == rows


def test_read_metrics_complete_last_line_without_newline(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}')
    assert read_metrics(str(path)) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


def test_read_metrics_rejects_corrupt_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_metrics(str(path))


# --- plot --------------------------------------------------------------------------------------

RECORDS = [
    {"step": 1, "loss": 3.0, "learning_rate": 1e-4},
    {"step": 2, "loss": 2.5, "learning_rate": 1e-4},
    {"step": 2, "eval_loss": 2.7, "eval_accuracy": 0.4, "eval_macro_f1": 0.3},
    {"step": 3, "loss": 2.0, "learning_rate": 5e-5},
    {"step": 4, "eval_loss": 2.2, "eval_accuracy": 0.6, "eval_macro_f1": float("nan")},
]


@pytest.mark.parametrize("records", [RECORDS, [r for r in RECORDS if "loss" in r]], ids=["two_panels", "one_panel"])
def test_plot_metrics_writes_png_atomically(tmp_path, records):
    path = tmp_path / "metrics.png"
    plot_metrics(records, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(tmp_path) == ["metrics.png"]


def test_plot_metrics_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "metrics.png"
    path.write_bytes(b"old")

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plot_metrics(RECORDS, str(path))
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["metrics.png"]


def test_plot_metrics_needs_step(tmp_path):
    with pytest.raises(ValueError, match="step"):
        plot_metrics([{"loss": 1.0}], str(tmp_path / "m.png"))


def test_import_does_not_import_matplotlib():
    code = "import sys, ettin_jax.train.metrics; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
