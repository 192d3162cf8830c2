"""Which platform a program is compiled for, and whether JAX has started: the one place every
platform-specific choice asks (attention backends, the XLA:CPU tuning in `compilation`,
generation's kept weights, the train command's host memory). And the two numbers behind model
FLOPs utilisation (MFU), for the trainer and the benchmarks alike: a model's FLOPs
(`model_flops`) and a device's datasheet peak (`peak_flops`).

The platform is that of the active mesh's devices when a mesh is set: a TPU topology described
on a CPU host compiles ahead of time for TPU, and gets TPU choices. Without a mesh it is JAX's
default backend.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import jax
import jax.numpy as jnp


def compile_platform() -> str:
    """ "cpu", "gpu" or "tpu": the platform of the program being traced or about to run."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def on_cpu() -> bool:
    return compile_platform() == "cpu"


def backend_started() -> bool:
    """Whether JAX has started a backend (after which `jax.distributed.initialize` and
    process-wide settings such as malloc's come too late)."""
    from jax._src import xla_bridge

    return bool(getattr(xla_bridge, "_backends", None))


def will_run_on_cpu() -> bool:
    """Whether JAX will pick the CPU, decided without starting a backend: JAX_PLATFORMS says
    so, or no GPU or TPU plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "") or ""
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))


# ---- MFU ----------------------------------------------------------------------------------
def model_flops(config: Any, batch: int, length: int, *, training: bool = False, causal_lm: bool = True) -> float:
    """The matmul FLOPs of one forward over `batch` rows of `length` tokens of a model with
    `config` (a ModernBertDecoderConfig): the projections, the MLP, the head, and causal attention
    over the keys each query sees (on average (T + 1) / 2 on global layers; on sliding layers
    min(t + 1, window) averaged over t). `causal_lm` False: a sequence classifier's, whose head
    runs on one pooled token per row, instead of the LM head and vocabulary projection on every
    token.

    `training`: a train step's, 3x the forward (the backward computes two matmuls, the input's
    and the weight's gradient, for each of the forward's). Recomputation under remat is not
    counted: MFU counts the FLOPs the model needs, not those the hardware ran (PaLM, appendix B).
    Elementwise work (norms, activations, softmax) is left out, as MFU conventions do."""
    d, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = batch * length
    per_layer = 2 * (4 * d * d + d * 2 * inner + inner * d)  # q, k, v, o; Wi (GeGLU: 2 x inner); Wo
    flops = tokens * layers * per_layer
    if causal_lm:
        flops += tokens * (2 * d * d + 2 * d * config.vocab_size)  # lm_head dense, decoder
    else:
        flops += batch * (2 * d * d + 2 * d * config.num_labels)  # head dense, classifier
    window = config.sliding_window
    sliding_seen = (
        (length + 1) / 2 if length <= window else (window * (window + 1) / 2 + (length - window) * window) / length
    )
    for kind in config.layer_types:
        seen = (length + 1) / 2 if kind == "full_attention" else sliding_seen
        flops += tokens * 2 * 2 * seen * d  # q k^T and p v
    return 3 * flops if training else flops


# Dense peak FLOP/s of one JAX device (without 2:4 sparsity; a datasheet's "with sparsity"
# figure halved), by device_kind pattern, the first match wins:
# - NVIDIA H100 Tensor Core GPU Architecture whitepaper (SXM5 and PCIe) and H100 datasheet (NVL);
#   H200 datasheet (SXM, NVL); A100 datasheet (SXM and PCIe alike); L4 datasheet.
# - Google Cloud TPU documentation, per chip, each one JAX device: v4 275, v5e 197, v5p 459,
#   v6e (Trillium) 918 bf16 TFLOP/s.
# float32 is the rate of a float32 matmul at JAX's default precision: TF32 tensor cores on these
# GPUs, one bfloat16 pass on TPU (the JAX documentation, "Matmul precision"). With
# `jax_default_matmul_precision="highest"` the real peak is lower and MFU reads low.
_PEAKS: tuple[tuple[str, float, float], ...] = (  # (pattern, bfloat16, float32)
    (r"H100.*PCIe", 756e12, 378e12),
    (r"H100.*NVL", 835e12, 417.5e12),
    (r"H100", 989.4e12, 494.7e12),  # SXM5: "NVIDIA H100 80GB HBM3"
    (r"H200.*NVL", 835e12, 417.5e12),
    (r"H200", 989.4e12, 494.7e12),
    (r"A100", 312e12, 156e12),
    (r"\bL4\b", 121e12, 60e12),  # not L40 or L40S
    (r"^TPU v4$", 275e12, 275e12),
    (r"^TPU v5( lite|e)$", 197e12, 197e12),
    (r"^TPU v5p?$", 459e12, 459e12),
    (r"^TPU v6( lite|e)$", 918e12, 918e12),
)


def peak_flops(device: Any, dtype: Any) -> float | None:
    """Dense peak FLOP/s of one `device` (a jax.Device or its `device_kind`) computing in
    `dtype` (bfloat16 or float32), from its datasheet; None for a CPU, a device not in the
    table, or another dtype: MFU is then not reported."""
    kind = device if isinstance(device, str) else device.device_kind
    column = {"bfloat16": 1, "float32": 2}.get(jnp.dtype(dtype).name)
    if column is None:
        return None
    return next((row[column] for row in _PEAKS if re.search(row[0], kind)), None)
