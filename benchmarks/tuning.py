"""A/B of each CPU-only tuning on the program it targets, to decide whether it stays (it must
earn at least 10% there). Same weights, same inputs, CPU float32; each pair alternates call by
call (median of `--repeats`), so that a slow spell on a shared machine hits both sides.

| tuning | where | A/B on |
| --- | --- | --- |
| XLA:CPU options (`compilation.TunedJit`) | every jitted program | greedy generate, LM train step |
| `compilation.gradient_fence` | each decoder layer | LM and classifier train steps |
| kept output kernel (`generation._output_kernel`) | generate | greedy generate |
| `compilation.keep_host_memory` | the train command | LM train step, in fresh processes |

    python benchmarks/tuning.py            # everything, 17m shape
    python benchmarks/tuning.py --record   # and append the table to RESULTS.md

Fused q/k/v decode projections were removed after such an A/B found no gain (RESULTS.md,
2026-11-30).

Each side of a pair is its own Python function: JAX caches a function's trace across `jit`
objects, so two jits of one function would run the same program whatever was patched between.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np
from common import cpu_model, measure_alternating, report

BATCH, LENGTH = 16, 128  # train step: 16 sequences of 128 tokens


def train_state(size: str, task: str):
    import jax.numpy as jnp
    from flax import nnx

    import ettin_jax as ej
    from ettin_jax.train.optim import OptimizerConfig, make_optimizer
    from ettin_jax.train.steps import create_train_state

    config = ej.ModernBertDecoderConfig.ettin(size)
    if task == "lm":
        cls = ej.ModernBertDecoderForCausalLM
    else:
        config = config.replace(num_labels=2, problem_type="single_label_classification")
        cls = ej.ModernBertDecoderForSequenceClassification
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 50000, size=(1, BATCH, LENGTH)).astype(np.int32)
    labels = ids if task == "lm" else rng.integers(0, 2, size=(1, BATCH)).astype(np.int32)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids), "labels": jnp.asarray(labels)}
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-4, schedule="constant", max_grad_norm=None))
    # A model of its own for each state: a train step donates (deletes) its state's arrays.
    return lambda: create_train_state(cls(config, rngs=nnx.Rngs(0)), tx), batch


def step_runner(make_state, batch, program):
    """A callable that runs one train step with `program` on a state of its own."""
    import jax

    holder = {"state": make_state()}

    def run() -> float:
        state, metrics = program(holder["state"], batch, jax.random.key_data(jax.random.key(0)))
        holder["state"] = state
        return float(metrics["loss"])

    return run


def ab_cpu_options(size: str, repeats: int) -> list[tuple[str, str, float, float]]:
    from flax import nnx

    import ettin_jax as ej

    rows = []
    model = ej.ModernBertDecoderForCausalLM(ej.ModernBertDecoderConfig.ettin(size), rngs=nnx.Rngs(0))
    from ettin_jax import generation

    for batch in (1, 16):
        prompts = np.random.default_rng(0).integers(0, 50000, size=(batch, 32))

        def run(tuned: bool, prompts=prompts):
            program = generation._generate_program
            program._chosen = program._tuned if tuned else program._plain
            return model.generate(prompts, max_new_tokens=128, eos_token_id=[])

        t = measure_alternating({"on": lambda: run(True), "off": lambda: run(False)}, repeats, settle=0.2)
        rows.append(("XLA:CPU options", f"generate {size} batch {batch}, 32 + 128 tokens", t["on"], t["off"]))
    make_state, batch = train_state(size, "lm")
    tuned, plain = _own_step(), _own_step()
    plain._chosen = plain._plain
    t = measure_alternating(
        {"on": step_runner(make_state, batch, tuned), "off": step_runner(make_state, batch, plain)}, repeats, 0.2
    )
    rows.append(("XLA:CPU options", f"LM train step {size}, {BATCH}x{LENGTH}", t["on"], t["off"]))
    return rows


def _own_step():
    """A jitted train step of its own (see the module docstring)."""
    from ettin_jax import compilation
    from ettin_jax.train import steps

    return compilation.jit(lambda state, batch, rng: steps._train_step(state, batch, rng), donate_argnums=(0,))


def ab_gradient_fence(size: str, repeats: int) -> list[tuple[str, str, float, float]]:
    from ettin_jax import modeling

    rows = []
    for task in ("lm", "classify"):
        make_state, batch = train_state(size, task)
        fenced, bare = step_runner(make_state, batch, _own_step()), step_runner(make_state, batch, _own_step())
        fenced()  # traced with the fence
        saved = modeling.gradient_fence
        modeling.gradient_fence = lambda x: x
        try:
            bare()  # traced without it; later calls reuse that program
        finally:
            modeling.gradient_fence = saved
        t = measure_alternating({"on": fenced, "off": bare}, repeats, settle=0.2)
        rows.append(("gradient_fence", f"{task} train step {size}, {BATCH}x{LENGTH}", t["on"], t["off"]))
    return rows


def ab_kept_kernel(size: str, repeats: int) -> list[tuple[str, str, float, float]]:
    from flax import nnx

    import ettin_jax as ej
    from ettin_jax import generation

    rows = []
    model = ej.ModernBertDecoderForCausalLM(ej.ModernBertDecoderConfig.ettin(size), rngs=nnx.Rngs(0))
    kept = generation._output_kernel
    for batch in (1, 16):
        prompts = np.random.default_rng(0).integers(0, 50000, size=(batch, 32))

        def run(keep: bool, prompts=prompts):
            generation._output_kernel = kept if keep else (lambda *args: None)  # None: derived in each call
            try:
                return model.generate(prompts, max_new_tokens=128, eos_token_id=[])
            finally:
                generation._output_kernel = kept

        t = measure_alternating({"on": lambda: run(True), "off": lambda: run(False)}, repeats, settle=0.2)
        rows.append(("kept output kernel", f"generate {size} batch {batch}, 32 + 128 tokens", t["on"], t["off"]))
    return rows


def child_step(size: str, keep: bool, steps_: int) -> None:
    """In a fresh process: the median LM train step time, with or without keep_host_memory."""
    from ettin_jax import compilation

    if keep and not compilation.keep_host_memory():
        raise SystemExit("keep_host_memory did not apply")
    from ettin_jax.train.steps import train_step

    make_state, batch = train_state(size, "lm")
    run = step_runner(make_state, batch, train_step)
    run()
    times = []
    for _ in range(steps_):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(json.dumps({"median": float(np.median(times))}))


def ab_keep_host_memory(size: str, repeats: int) -> list[tuple[str, str, float, float]]:
    out: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(max(3, repeats // 2)):  # a process per run: fewer pairs, each a median of 6 steps
        for side in ("on", "off"):
            cmd = [sys.executable, __file__, "--child", side, "--sizes", size]
            result = subprocess.run(cmd, check=True, capture_output=True, text=True)
            out[side].append(json.loads(result.stdout.strip().splitlines()[-1])["median"])
    on, off = float(np.median(out["on"])), float(np.median(out["off"]))
    return [("keep_host_memory", f"LM train step {size}, {BATCH}x{LENGTH}, fresh processes", on, off)]


PARTS = {
    "cpu_options": ab_cpu_options,
    "gradient_fence": ab_gradient_fence,
    "kept_kernel": ab_kept_kernel,
    "keep_host_memory": ab_keep_host_memory,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["17m"])
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.child:
        child_step(args.sizes[0], args.child == "on", steps_=6)
        return
    import jax

    rows = []
    for size in args.sizes:
        for part in args.parts:
            for row in PARTS[part](size, args.repeats):
                rows.append(row)
                name, program, on, off = row
                print(f"{name:>20}  {program:<45} on {on:.3f} s  off {off:.3f} s  gain {off / on:.2f}x", flush=True)
    header = (
        f"\n### CPU tunings, A/B, {datetime.date.today()}, {cpu_model()}, {os.cpu_count()} cores\n\n"
        f"jax {jax.__version__}; `python benchmarks/tuning.py`: each tuning on and off on the program it targets, "
        f"alternating call by call, median of {args.repeats}; a tuning stays if it earns at least 1.10x.\n\n"
        "| tuning | program | on (s) | off (s) | gain |\n| --- | --- | --- | --- | --- |\n"
    )
    table = "".join(f"| {n} | {p} | {on:.3f} | {off:.3f} | {off / on:.2f}x |\n" for n, p, on, off in rows)
    report(header + table, args.record)


if __name__ == "__main__":
    main()
