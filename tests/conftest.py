"""Fixtures: tiny random checkpoints saved by transformers."""

from __future__ import annotations

import pytest
from helpers import TINY, VOCAB, WINDOW, random_ids, tiny_config, to_numpy, torch_model

__all__ = ["TINY", "VOCAB", "WINDOW", "random_ids", "tiny_config", "to_numpy", "torch_model"]


@pytest.fixture
def saved(tmp_path):
    """saved(kind, **overrides) -> (torch model, directory it was saved to)."""

    def make(kind: str = "causal", seed: int = 0, **overrides):
        model = torch_model(kind, seed, **overrides)
        directory = tmp_path / f"{kind}-{seed}-{abs(hash(repr(sorted(overrides.items()))))}"
        model.save_pretrained(directory)
        return model, str(directory)

    return make


@pytest.fixture(scope="session")
def default_home(tmp_path_factory):
    """ETTIN_JAX_HOME in a temporary directory, so the default model is built fresh, once."""
    import os

    home = str(tmp_path_factory.mktemp("ettin-home"))
    old = os.environ.get("ETTIN_JAX_HOME")
    os.environ["ETTIN_JAX_HOME"] = home
    yield home
    if old is None:
        del os.environ["ETTIN_JAX_HOME"]
    else:
        os.environ["ETTIN_JAX_HOME"] = old
