"""The jit wrapper that adds XLA:CPU options: used on CPU, dropped when XLA does not know them."""

from __future__ import annotations

import copy
import platform
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import TINY

import ettin_jax as ej
from ettin_jax import compilation, generation, pipelines
from ettin_jax.train import steps

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are XLA:CPU's")


def _f(x, y):
    return jnp.tanh(x @ y).sum(axis=0)


def _xy():
    return jax.random.normal(jax.random.key(0), (16, 32)), jax.random.normal(jax.random.key(1), (32, 64))


def test_cpu_compiles_with_the_options_and_computes_the_same():
    x, y = _xy()
    tuned = compilation.jit(lambda x, y: _f(x, y))  # its own function: jit caches are per function
    np.testing.assert_allclose(tuned(x, y), jax.jit(_f)(x, y), rtol=1e-6, atol=1e-6)
    assert tuned._chosen is tuned._tuned
    assert tuned._cache_size() == 1  # counts the build that ran
    # The option is in effect: XLA's default puts this dot in a YNNPACK fusion, the tuned build does not.
    assert "ynn" in tuned._plain.lower(x, y).compile().as_text()
    assert "ynn" not in tuned._tuned.lower(x, y).compile().as_text()
    # jit's public attributes pass through; clear_cache clears both builds.
    assert tuned.__name__ == "<lambda>" and tuned.lower(x, y).compile() is not None
    tuned.clear_cache()
    assert tuned._cache_size() == 0
    assert copy.copy(tuned)(x, y).shape == (64,)  # no endless __getattr__ recursion


def test_an_option_xla_does_not_know_falls_back_to_plain_jit():
    tuned = compilation.TunedJit(_f, options={"xla_cpu_no_such_option": True})
    x, y = _xy()
    np.testing.assert_array_equal(tuned(x, y), jax.jit(_f)(x, y))
    assert tuned._chosen is tuned._plain


def test_other_runtime_errors_are_not_swallowed():
    tuned = compilation.jit(_f)

    def out_of_memory(*args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")

    tuned._tuned = out_of_memory
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        tuned(*_xy())
    assert tuned._chosen is out_of_memory  # not silently switched to the plain build


@pytest.mark.parametrize(
    "program",
    [
        generation._generate_program,
        generation._prefill_program,
        generation._stream_program,
        generation._prompt_tokens_program,
        steps._train_step_program,
        steps._eval_step_program,
        pipelines._probabilities,
    ],
)
def test_the_library_programs_are_tuned(program):
    assert isinstance(program, compilation.TunedJit)


# ---- gradient_fence -------------------------------------------------------------------------
def test_gradient_fence_is_the_identity_forward_and_backward():
    x = jnp.array([1.0, -2.0, 0.5])
    f = lambda x: jnp.sum(jnp.sin(compilation.gradient_fence(x * 3.0)))  # noqa: E731
    assert f(x) == jnp.sum(jnp.sin(x * 3.0))
    np.testing.assert_array_equal(jax.jit(jax.grad(f))(x), 3.0 * jnp.cos(x * 3.0))
    # A NaN in the cotangent (the conditional's other branch) passes through unchanged too.
    g = jax.jit(jax.grad(lambda x: jnp.sum(compilation.gradient_fence(x) * jnp.array([jnp.nan, 2.0, 3.0]))))(x)
    assert np.isnan(g[0]) and g[1:].tolist() == [2.0, 3.0]


def _largest_fusion(hlo: str) -> int:
    """The most operands any fusion of a compiled program takes."""
    return max(len(re.findall(r"%[\w.-]+", m)) for m in re.findall(r"= \S+ fusion\(([^)]*)\)", hlo))


def test_the_train_backward_does_not_recompute_the_residual_chain(monkeypatch):
    """Without the fences XLA:CPU fuses the residual stream's gradient chain, through every
    layer above, into each weight gradient's transposed copy: fusions grow with depth."""
    config = ej.ModernBertDecoderConfig(**{**TINY, "num_hidden_layers": 8})
    model = ej.ModernBertDecoderForCausalLM(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jnp.asarray(np.arange(4 * 16).reshape(4, 16) % config.vocab_size, jnp.int32)

    def loss(params):
        return nnx.merge(graphdef, params, rest)(ids).logits.astype(jnp.float32).std()

    def largest() -> int:
        return _largest_fusion(
            jax.jit(jax.grad(loss), compiler_options=compilation.CPU_OPTIONS).lower(params).compile().as_text()
        )

    fenced = largest()
    monkeypatch.setattr("ettin_jax.modeling.gradient_fence", lambda x: x)
    unfenced = largest()
    assert unfenced > 40, unfenced  # the positive control: the chain is there to be cut
    assert fenced < 20 < unfenced, (fenced, unfenced)


_FAULTS_SCRIPT = """
import resource, sys
from ettin_jax import compilation
kept = compilation.keep_host_memory() if sys.argv[1] == "keep" else None
import jax, jax.numpy as jnp
step = jax.jit(lambda x: (jnp.exp(x[:, None] * x[None, :]) @ x[:, None]).sum())  # a 64 MiB matmul operand
x = jnp.linspace(0.0, 1e-3, 4096)
for _ in range(10):  # the kept heap settles after a few calls
    step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
print(kept, compilation.keep_host_memory(), faults)
"""


def _huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_host_memory tunes glibc's malloc")
@pytest.mark.skipif(_huge_pages_always(), reason="with transparent huge pages always on, faults count 2 MiB pages")
def test_keep_host_memory_stops_the_page_faults_of_each_step():
    """Each call of a program with a large temporary faults its pages in afresh under glibc's
    defaults; after keep_host_memory (called before JAX starts), it reuses them. Once the backend
    has started the function refuses: it would only half apply."""

    def run(mode):
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True
        ).stdout.split()
        return out[0], out[1], float(out[2])

    kept, again, faults = run("keep")
    assert (kept, again) == ("True", "True")  # and a second call says the same
    untouched, late, faults_by_default = run("default")
    assert untouched == "None" and late == "False"  # too late: the backend has started
    assert faults_by_default > 15_000  # 64 MiB is 16,384 pages, at every call
    # Kept, the heap has room for the temporary: at most an occasional call grows it (measured:
    # 3 of 20 calls, from the heap's fragmentation under asynchronous dispatch).
    assert faults < faults_by_default / 2


def test_cpu_tuning_never_reaches_a_tpu_program():
    """Platform choices follow the mesh being compiled for: under a TPU topology's mesh on this
    CPU host (as benchmarks/tpu_aot.py compiles), the jit drops the XLA:CPU options, generation
    derives its output kernel in the program instead of keeping a CPU copy, and the 1b train
    step holds no gradient fence (its backward is a `cond`), which the CPU's step has."""
    from ettin_jax import platforms, sharding

    try:
        from jax._src.mesh import AbstractDevice  # what the mesh of a TPU topology carries

        tpu = jax.sharding.AbstractMesh((1, 2, 2), sharding.AXES, abstract_device=AbstractDevice("TPU v5", 1, "tpu"))
    except (ImportError, TypeError) as e:  # a private JAX type: skip rather than fail if it moves
        pytest.skip(f"this JAX has no AbstractDevice as expected: {e}")
    model = ej.ModernBertDecoderForCausalLM(ej.ModernBertDecoderConfig(**TINY), rngs=nnx.Rngs(0))
    on_this_cpu, for_tpu = compilation.jit(_f), compilation.jit(_f)
    on_this_cpu(*_xy())
    assert on_this_cpu._chosen is on_this_cpu._tuned  # the positive control
    assert generation._output_kernel(model, *nnx.split(model)) is not None
    with jax.sharding.use_abstract_mesh(tpu):
        assert platforms.compile_platform() == "tpu"
        assert generation._output_kernel(model, *nnx.split(model)) is None
        for_tpu(*_xy())
        assert for_tpu._chosen is for_tpu._plain
    config = ej.ModernBertDecoderConfig.ettin("1b", attention_impl="xla")
    assert "cond" not in _primitives(_train_step_jaxpr(config, tpu))
    assert "cond" in _primitives(_train_step_jaxpr(ej.ModernBertDecoderConfig(**TINY)))  # the positive control


def _primitives(jaxpr) -> set[str]:
    """Every primitive of a jaxpr, those of its sub-jaxprs (scans, remat, custom rules) included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


def _train_step_jaxpr(config: ej.ModernBertDecoderConfig, mesh=None):
    """The causal LM's train step traced abstractly (no weights are made), under `mesh` if given."""
    from ettin_jax.train.optim import OptimizerConfig, make_optimizer

    model = nnx.eval_shape(lambda: ej.ModernBertDecoderForCausalLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    model.model.remat = True
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-4))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    state = steps.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params, frozen={}, opt_state=jax.eval_shape(tx.init, params),
        rng=key, rest=rest, class_weights=None, graphdef=graphdef, tx=tx, task="causal_lm",
    )  # fmt: skip
    tokens = jax.ShapeDtypeStruct((1, 8, 64), jnp.int32)
    batch = {"input_ids": tokens, "attention_mask": tokens, "labels": tokens}
    if mesh is None:
        return jax.make_jaxpr(steps._train_step)(state, batch, key).jaxpr
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.make_jaxpr(steps._train_step)(state, batch, key).jaxpr
