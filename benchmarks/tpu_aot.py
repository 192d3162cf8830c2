"""Ahead-of-time compilation for TPU topologies, without a TPU: the 1b shape's train step and
generate on a v5e-16 and a v5p-8 mesh, with the memory each device would need.

JAX compiles for a TPU topology it describes with `jax.experimental.topologies` when libtpu is
installed; no TPU has to be attached. Keep libtpu out of the main environment (JAX would look
for a TPU at every start) and use a venv that shares everything else:

    python -m venv --system-site-packages /tmp/tpu && /tmp/tpu/bin/pip install "libtpu==0.0.42.*"
    /tmp/tpu/bin/python benchmarks/tpu_aot.py --record

(libtpu 0.0.42 is the version jax 0.10.2's `jax[tpu]` extra pins.) The programs compiled are the
library's own: `train.steps._train_step` and `generation._generate_program`, with params,
optimizer state and batches sharded by `ettin_jax.sharding`.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import cpu_model, report
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ettin_jax import ModernBertDecoderConfig, ModernBertDecoderForCausalLM, sharding
from ettin_jax.generation import _generate_program, _Static
from ettin_jax.sampling import SamplingConfig
from ettin_jax.train.optim import OptimizerConfig, make_optimizer
from ettin_jax.train.steps import TrainState, _train_step, opt_state_shardings

# name: (topology, mesh (data, fsdp, tensor), HBM per chip in GiB as the compiler reports it)
TOPOLOGIES = {
    "v5e-16": ("v5e:4x4", (1, 16, 1), 15.75),
    "v5p-8": ("v5p:2x2x1", (1, 4, 1), 95.74),
}
GiB = 2**30


def abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compile_train(mesh, config, batch: int, length: int, remat: bool):
    model = nnx.eval_shape(
        lambda: ModernBertDecoderForCausalLM(config, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    )
    model.model.remat = remat
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    params = abstract(params, sharding.state_shardings(params, mesh))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-4, weight_decay=0.1, max_grad_norm=1.0))
    opt_state = abstract(jax.eval_shape(tx.init, params), opt_state_shardings(tx, params, mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    state = TrainState(
        step=scalar,
        params=params,
        frozen={},
        opt_state=opt_state,
        rng=key,
        rest=rest,
        class_weights=None,
        graphdef=graphdef,
        tx=tx,
        task="causal_lm",
    )
    rows = sharding.batch_sharding(mesh, 3, axis=1, size=batch)
    tokens = jax.ShapeDtypeStruct((1, batch, length), jnp.int32, sharding=rows)
    batch_ = {"input_ids": tokens, "attention_mask": tokens, "labels": tokens}
    with sharding.activate(mesh):
        return jax.jit(_train_step, donate_argnums=0).lower(state, batch_, key).compile()


def compile_generate(mesh, config, batch: int, prompt: int, new: int):
    model = nnx.eval_shape(
        lambda: ModernBertDecoderForCausalLM(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(model)
    state = abstract(state, sharding.state_shardings(state, mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = sharding.batch_sharding(mesh, 2, size=batch)

    def sds(shape, dtype, where):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=where)

    sampling = SamplingConfig(False, 1.0, None, None, None, None)
    values = {k: sds((), v.dtype, replicated) for k, v in sampling.values().items()}
    key = jax.eval_shape(lambda: jax.random.key(0))
    static = _Static(sampling.static(), (50282,), 50283, new)
    with sharding.activate(mesh):
        return _generate_program.lower(
            graphdef, state, None, sds((batch, prompt), jnp.int32, rows), sds((batch, prompt), bool, rows),
            sds((batch,), bool, sharding.batch_sharding(mesh, 1, size=batch)), sds((), jnp.int32, replicated),
            sds((), jnp.int32, replicated), values, sds((), key.dtype, replicated), static=static,
        ).compile()  # fmt: skip


def describe(compiled, hbm: float) -> str:
    m = compiled.memory_analysis()
    need = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return (
        f"{need / GiB:.2f} GiB of {hbm:.2f} (arguments {m.argument_size_in_bytes / GiB:.2f}, "
        f"temporaries {m.temp_size_in_bytes / GiB:.2f}, outputs not aliased "
        f"{(m.output_size_in_bytes - m.alias_size_in_bytes) / GiB:.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1b")
    parser.add_argument("--topology", choices=sorted(TOPOLOGIES), action="append")
    parser.add_argument("--train-batch", type=int, default=32, help="sequences per train step")
    parser.add_argument("--length", type=int, default=2048, help="train sequence length")
    parser.add_argument("--gen-batch", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=512)
    parser.add_argument("--program", choices=("train", "generate"), action="append", help="default: both")
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args()
    try:
        from jax.experimental import topologies
    except ImportError as e:
        raise SystemExit(f"this JAX cannot describe TPU topologies ({e})") from None

    config = ModernBertDecoderConfig.ettin(args.size)
    lines = [
        f"`{args.size}` shape, jax {jax.__version__}, compiled ahead of time on this CPU; memory per device "
        "from `compiled.memory_analysis()` (arguments + temporaries + outputs that do not alias an input).",
        "",
        "| topology | mesh (data, fsdp, tensor) | program | memory per device | compile s |",
        "|---|---|---|---|---|",
    ]
    for name in args.topology or sorted(TOPOLOGIES):
        topology, shape, hbm = TOPOLOGIES[name]
        try:
            devices = topologies.get_topology_desc(topology, "tpu").devices
        except Exception as e:  # no libtpu: say so rather than a traceback
            raise SystemExit(
                f"cannot describe TPU topology {topology}: {e}; install libtpu in a venv (see --help)"
            ) from None
        mesh = Mesh(np.array(devices).reshape(shape), sharding.AXES, axis_types=(AxisType.Auto,) * 3)
        programs = {
            "train": (
                f"train step, {args.train_batch}x{args.length}, bf16 on f32 master, AdamW, remat",
                lambda m=mesh: compile_train(m, config, args.train_batch, args.length, remat=True),
            ),
            "generate": (
                f"generate, batch {args.gen_batch}, prompt {args.prompt} + {args.new} new, bf16",
                lambda m=mesh: compile_generate(m, config, args.gen_batch, args.prompt, args.new),
            ),
        }
        for label, build in (programs[p] for p in args.program or ("generate", "train")):
            print(f"compiling {name}: {label} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                text = describe(build(), hbm)
            except Exception as e:  # e.g. RESOURCE_EXHAUSTED: report it as the result
                text = f"does not compile: {str(e).splitlines()[0][:160]}"
            lines.append(f"| {name} | {shape} | {label} | {text} | {time.perf_counter() - start:.1f} |")
            print(lines[-1], flush=True)
    header = f"\n### TPU ahead-of-time compilation, {datetime.date.today()}, on {cpu_model()}\n\n"
    report(header + "\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    main()
