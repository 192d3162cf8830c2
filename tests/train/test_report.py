"""TensorBoard event files read back with TensorBoard's own reader; the per-step throughput; and
the numbers behind MFU (`ettin_jax.platforms`): model FLOPs against the model's own weights,
datasheet peaks by device name."""

from __future__ import annotations

import sys

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import TINY

from ettin_jax import ModernBertDecoderConfig, ModernBertDecoderForCausalLM, ModernBertDecoderForSequenceClassification
from ettin_jax.platforms import model_flops, peak_flops
from ettin_jax.train.args import TrainingError
from ettin_jax.train.report import TensorBoardWriter, throughput

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _read(directory: str) -> dict[str, list[tuple[int, float]]]:
    reader = event_accumulator.EventAccumulator(directory)
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def test_scalars_read_back(tmp_path):
    directory = str(tmp_path / "tensorboard")
    with TensorBoardWriter(directory) as writer:
        writer.write({"step": 10, "epoch": 0.5, "loss": 2.25, "learning_rate": 1e-4, "grad_norm": 3}, step=10)
        writer.write({"step": 20, "loss": 1.5, "eval_loss": 1.75, "eval_accuracy": 0.625}, step=20)
        writer.write({"loss": np.float32(1.0), "note": "not a number", "stopped": True}, step=30)
    assert _read(directory) == {
        "train/epoch": [(10, 0.5)],
        "train/loss": [(10, 2.25), (20, 1.5), (30, 1.0)],
        "train/learning_rate": [(10, pytest.approx(1e-4))],  # stored as float32
        "train/grad_norm": [(10, 3.0)],
        "eval/loss": [(20, 1.75)],
        "eval/accuracy": [(20, 0.625)],
    }


def test_flush_makes_scalars_readable_before_close(tmp_path):
    writer = TensorBoardWriter(str(tmp_path))
    writer.write({"loss": 0.5}, step=1)
    writer.flush()
    assert _read(str(tmp_path)) == {"train/loss": [(1, 0.5)]}
    writer.close()


def test_resume_purges_what_the_killed_run_logged_after_its_checkpoint(tmp_path):
    """A run killed after logging step 4 resumes from its checkpoint at step 2, at once (event
    files are named by the second): TensorBoard shows steps 1 and 2 of the first run, then the
    resumed run's 3 and 4."""
    with TensorBoardWriter(str(tmp_path)) as first:
        for step in (1, 2, 3, 4):
            first.write({"loss": float(step)}, step=step)
    with TensorBoardWriter(str(tmp_path), purge_step=3) as resumed:
        for step in (3, 4):
            resumed.write({"loss": 10.0 * step}, step=step)
    assert len(list(tmp_path.iterdir())) == 2  # one event file per run
    assert _read(str(tmp_path)) == {"train/loss": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]}


def test_missing_tensorboardx_says_how_to_install(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "tensorboardX"] + ["tensorboardX"]:
        monkeypatch.setitem(sys.modules, name, None)  # every import of it fails, as if not installed
    with pytest.raises(TrainingError, match=r"pip install 'ettin-jax\[train\]'"):
        TensorBoardWriter(str(tmp_path / "tensorboard"))
    assert not (tmp_path / "tensorboard").exists()


# ---- throughput ---------------------------------------------------------------------------------
def test_throughput():
    assert throughput(0.5, 4096, 3e12, 989.4e12 * 8) == {
        "tokens_per_second": 8192.0,
        "mfu": pytest.approx(3e12 / 0.5 / (989.4e12 * 8)),
    }
    assert throughput(2.0, 100, 1e9, None) == {"tokens_per_second": 50.0}  # peak unknown: no MFU


@pytest.mark.parametrize("seconds", [0.0, -1.0, float("nan"), float("inf")])
def test_throughput_needs_a_positive_time(seconds):
    with pytest.raises(ValueError, match="positive"):
        throughput(seconds, 10, 1.0, 1.0)


# ---- model FLOPs and device peaks (ettin_jax.platforms) ------------------------------------------
def _matmul_weights(model_class, config) -> tuple[int, int]:
    """(weights of the matmuls each token goes through in the decoder layers, those of the rest:
    the head, and the embedding table as the tied vocabulary projection), from the model itself."""
    model = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0)))
    layers = rest = 0
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if len(leaf.shape) == 2:
            if "layers" in path:
                layers += leaf.size
            else:
                rest += leaf.size
    return layers, rest


def _attention(config, batch: int, length: int) -> float:
    """q k^T and p v over the keys each query sees, counted query by query."""
    d, total = config.hidden_size, 0
    for kind in config.layer_types:
        for t in range(length):
            seen = t + 1 if kind == "full_attention" else min(t + 1, config.sliding_window)
            total += 2 * 2 * seen * d
    return batch * total


@pytest.mark.parametrize("length", [5, 40])  # shorter and longer than the sliding window (8)
def test_model_flops_of_the_causal_lm(length):
    config = ModernBertDecoderConfig(**TINY)
    assert config.tie_word_embeddings  # the embedding table is the vocabulary projection
    layers, rest = _matmul_weights(ModernBertDecoderForCausalLM, config)
    batch = 3
    expected = 2 * batch * length * (layers + rest) + _attention(config, batch, length)
    assert model_flops(config, batch, length) == pytest.approx(expected, rel=1e-12)
    assert model_flops(config, batch, length, training=True) == pytest.approx(3 * expected, rel=1e-12)


def test_model_flops_of_a_classifier():
    """The base model on every token; the head and classifier on one pooled token per row; no
    vocabulary projection (the embedding table is only read)."""
    config = ModernBertDecoderConfig(**TINY).replace(num_labels=3)
    layers, rest = _matmul_weights(ModernBertDecoderForSequenceClassification, config)
    head = rest - config.vocab_size * config.hidden_size
    batch, length = 2, 24
    expected = 2 * batch * length * layers + 2 * batch * head + _attention(config, batch, length)
    assert model_flops(config, batch, length, causal_lm=False) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("kind", "dtype", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e12),
        ("NVIDIA H100 80GB HBM3", "float32", 494.7e12),
        ("NVIDIA H100 PCIe", "bfloat16", 756e12),
        ("NVIDIA H100 NVL", "bfloat16", 835e12),
        ("NVIDIA H200", "bfloat16", 989.4e12),
        ("NVIDIA H200 NVL", "float32", 417.5e12),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
        ("NVIDIA A100 80GB PCIe", "float32", 156e12),
        ("NVIDIA L4", "bfloat16", 121e12),
        ("NVIDIA L40S", "bfloat16", None),
        ("TPU v4", "bfloat16", 275e12),
        ("TPU v4 lite", "bfloat16", None),
        ("TPU v5 lite", "bfloat16", 197e12),
        ("TPU v5e", "float32", 197e12),
        ("TPU v5", "bfloat16", 459e12),
        ("TPU v5p", "bfloat16", 459e12),
        ("TPU v6 lite", "bfloat16", 918e12),
        ("cpu", "float32", None),
        ("NVIDIA H100 80GB HBM3", "float16", None),
    ],
)
def test_peak_flops_by_device_kind(kind, dtype, peak):
    assert peak_flops(kind, dtype) == peak


def test_peak_flops_of_a_cpu_device_is_unknown():
    assert peak_flops(jax.devices("cpu")[0], jax.numpy.bfloat16) is None
