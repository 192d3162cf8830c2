"""LoRA against full fine-tuning: the train step's time and memory, for one Ettin shape.

Both sides train the same random causal LM (float32 master weights) on the same batch of random
token ids with AdamW, one side every weight, the other LoRA rank `--rank` on the default targets
(every projection of attention and MLP; `ettin_jax.train.lora`). Memory is what XLA plans for
the compiled step (`memory_analysis()`: its arguments, outputs and temporaries, the donated
state counted once) and the optimizer state alone; time is the median of `--steps` steps after
one compiling step, the two sides alternating so that both see the same load.

    python benchmarks/lora.py                        # 150m, 4 x 256 tokens, CPU float32
    python benchmarks/lora.py --size 1b --dtype bfloat16 --batch 8 --length 1024 --record
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
import time

import numpy as np
from common import cpu_model, report


def sides(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import ettin_jax as ej
    from ettin_jax.train import lora
    from ettin_jax.train.optim import OptimizerConfig, make_optimizer
    from ettin_jax.train.steps import create_train_state

    config = ej.ModernBertDecoderConfig.ettin(args.size)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-4))
    states = {}
    for side in ("full", "lora"):
        model = ej.ModernBertDecoderForCausalLM(config, dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(0))
        model.model.remat = args.remat
        trainable = nnx.Param
        if side == "lora":
            lora.apply_lora(model, lora.LoraConfig(args.rank), seed=0)
            trainable = lora.TRAINABLE
        states[side] = create_train_state(model, tx, seed=0, trainable=trainable)
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (1, args.batch, args.length)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
    return states, batch, jax


def nbytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="150m")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--remat", action="store_true", help="recompute each layer in the backward pass")
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = parser.parse_args()

    from ettin_jax.train import steps

    states, batch, jax = sides(args)
    rows = {}
    for side, state in states.items():
        compiled = steps._train_step_program.lower(state, batch, jax.random.PRNGKey(0)).compile()
        memory = compiled.memory_analysis()
        planned = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
        planned -= memory.alias_size_in_bytes  # the donated state, counted once
        rows[side] = {
            "trained": sum(x.size for x in jax.tree.leaves(state.params)),
            "optimizer": nbytes(state.opt_state),
            "planned": planned,
            "times": [],
        }
    for side in states:  # compile and warm up
        states[side], m = steps.train_step(states[side], batch, jax.random.PRNGKey(0))
        float(m["loss"])
    for _ in range(args.steps):
        for side in states:
            start = time.perf_counter()
            states[side], m = steps.train_step(states[side], batch, jax.random.PRNGKey(0))
            float(m["loss"])
            rows[side]["times"].append(time.perf_counter() - start)
    full, low = rows["full"], rows["lora"]
    device = jax.devices()[0]
    machine = cpu_model() if device.platform == "cpu" else device.device_kind
    lines = [
        f"\n### LoRA against full fine-tuning, {args.size} {args.dtype}, {machine} ({datetime.date.today().isoformat()})\n",
        f"`{shlex.join(['python', 'benchmarks/lora.py', *sys.argv[1:]])}` ({platform.python_version()}, jax {jax.__version__}): "
        f"causal LM, {args.batch} x {args.length} tokens per step, AdamW, LoRA rank {args.rank} on every attention "
        f"and MLP projection; median of {args.steps} steps after one compiling step, sides alternating. "
        "Planned memory is XLA's for the compiled step (arguments + outputs + temporaries, donated state once).\n",
        "| side | trained params | optimizer state (MB) | planned step memory (MB) | step (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for side, r in rows.items():
        lines.append(
            f"| {side} | {r['trained']:,} | {r['optimizer'] / 2**20:,.1f} | {r['planned'] / 2**20:,.0f} | "
            f"{statistics.median(r['times']):.3f} |"
        )
    lines.append(
        f"\nLoRA / full: trained params {low['trained'] / full['trained']:.2%}, optimizer state "
        f"{low['optimizer'] / full['optimizer']:.2%}, planned memory {low['planned'] / full['planned']:.2f}x, "
        f"step time {statistics.median(low['times']) / statistics.median(full['times']):.2f}x.\n"
    )
    report("\n".join(lines), args.record)


if __name__ == "__main__":
    main()
