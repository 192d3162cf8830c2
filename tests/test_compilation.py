"""The jit wrapper that adds XLA:CPU options: used on CPU, dropped when XLA does not know them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ettin_jax import compilation, generation
from ettin_jax.train import steps


def _f(x, y):
    return jnp.tanh(x @ y).sum(axis=0)


def test_cpu_compiles_with_the_options_and_computes_the_same():
    x, y = jax.random.normal(jax.random.key(0), (16, 32)), jax.random.normal(jax.random.key(1), (32, 64))
    tuned = compilation.jit(_f)
    np.testing.assert_allclose(tuned(x, y), jax.jit(_f)(x, y), rtol=1e-6, atol=1e-6)
    assert tuned._chosen is tuned._tuned  # the suite runs on CPU
    assert "ynn" not in tuned._tuned.lower(x, y).compile().as_text()  # the option is in effect
    assert tuned.__name__ == "_f" and tuned.lower(x, y).compile() is not None  # jit's attributes pass through


def test_an_option_xla_does_not_know_falls_back_to_plain_jit():
    tuned = compilation.TunedJit(_f, options={"xla_cpu_no_such_option": True})
    x = jnp.ones((2, 2))
    np.testing.assert_array_equal(tuned(x, x), jax.jit(_f)(x, x))
    assert tuned._chosen is tuned._plain


def test_other_errors_are_not_swallowed():
    tuned = compilation.jit(_f)
    with pytest.raises(TypeError, match="dot_general"):
        tuned(jnp.ones((2, 3)), jnp.ones((2, 3)))


@pytest.mark.parametrize(
    "program",
    [generation._generate_program, generation._prefill_program, generation._stream_program, steps._train_step_program],
)
def test_the_library_programs_are_tuned(program):
    assert isinstance(program, compilation.TunedJit)
