"""Fixtures: tiny random checkpoints saved by transformers."""

from __future__ import annotations

import gc
import os

import jax
import pytest
from helpers import TINY, VOCAB, WINDOW, random_ids, tiny_config, to_numpy, torch_model

# Eight CPU devices, as `XLA_FLAGS=--xla_force_host_platform_device_count=8` gives, so the
# sharding tests have a mesh to use; everything else runs on the first device as before.
# (helpers imports torch and transformers, neither of which starts a JAX backend.)
jax.config.update("jax_num_cpu_devices", 8)
# float32 matmuls at full precision on every platform: on a GPU, XLA's default is TF32, which
# misses the 1e-5 parity tolerances (on the CPU this changes nothing).
jax.config.update("jax_default_matmul_precision", "highest")
# The CLI keeps compiled programs on disk (ettin_jax.compile_cache); the tests that call it
# in-process must not write to the real home, and tests/test_compile_cache.py sets its own.
os.environ.setdefault("ETTIN_JAX_COMPILATION_CACHE", "off")

__all__ = ["TINY", "VOCAB", "WINDOW", "random_ids", "tiny_config", "to_numpy", "torch_model"]


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, JAX's compiled programs are dropped. XLA:CPU maps the code of
    every kernel it compiles into memory, a few thousand mappings per test module here
    (test_engine.py alone: 16,900), and they stay while the program is cached. The whole suite
    in one process passed Linux's default limit of 65,530 mappings (vm.max_map_count), and the
    next compilation crashed with a segmentation fault inside XLA (2026-11-30)."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def saved(tmp_path):
    """saved(kind, **overrides) -> (torch model, directory it was saved to)."""

    def make(kind: str = "causal", seed: int = 0, **overrides):
        model = torch_model(kind, seed, **overrides)
        directory = tmp_path / f"{kind}-{seed}-{abs(hash(repr(sorted(overrides.items()))))}"
        model.save_pretrained(directory)
        return model, str(directory)

    return make


@pytest.fixture(scope="module")
def causal_pair(tmp_path_factory):
    """(transformers causal LM, ettin-jax's copy loaded from its checkpoint), once per module."""
    import ettin_jax as ej

    directory = tmp_path_factory.mktemp("causal")
    reference = torch_model("causal")
    reference.save_pretrained(directory)
    return reference, ej.ModernBertDecoderForCausalLM.from_pretrained(directory)


@pytest.fixture(scope="session")
def default_home(tmp_path_factory):
    """ETTIN_JAX_HOME in a temporary directory, so that nothing a test makes (compiled programs) lands in the real home."""
    import os

    home = str(tmp_path_factory.mktemp("ettin-home"))
    old = os.environ.get("ETTIN_JAX_HOME")
    os.environ["ETTIN_JAX_HOME"] = home
    yield home
    if old is None:
        del os.environ["ETTIN_JAX_HOME"]
    else:
        os.environ["ETTIN_JAX_HOME"] = old
