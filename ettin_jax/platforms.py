"""Which platform a program is compiled for, and whether JAX has started: the one place every
platform-specific choice asks (attention backends, the XLA:CPU tuning in `compilation`,
generation's kept weights, the train command's host memory).

The platform is that of the active mesh's devices when a mesh is set: a TPU topology described
on a CPU host compiles ahead of time for TPU, and gets TPU choices. Without a mesh it is JAX's
default backend.
"""

from __future__ import annotations

import importlib.util
import os

import jax


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
