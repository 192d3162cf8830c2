"""int8 weights and the int8 KV cache (issue 20): bytes, decode speed, and engine throughput.

Parts (`--parts`, default: every part this backend runs):
- bytes: the params of each Ettin size in float32, bfloat16 and int8, counted abstractly;
- decode: greedy decode tokens/s of one model in float32 (CPU only), bfloat16 and int8
  weights, at each batch. The decode rate is the difference of two generate calls, `--new` and
  `--short` new tokens (EOS blocked): it excludes the prefill and the compilation. On a GPU
  each row also gives the fraction of the HBM roofline: (weight bytes + KV-cache bytes) read per
  step over the step time over the datasheet bandwidth;
- matmul (GPU): one decode-sized product x (B, D) @ W (D, F) in bf16, int8 as the model runs it
  (dequantized in bf16, scales on the output), int8 dequantized before the product, and qwix's
  `dot_general` on a QArray;
- engine: `generate_batch` on prompts of mixed lengths with the KV cache in the compute dtype and
  in int8 (same weights), tokens/s and whether the outputs agree.

Random weights (seed 0). On CPU the models compute in float32 (bf16 weights are converted), on
GPU in bfloat16. The anchor for int8 is our own float model: transformers' 8-bit path is
bitsandbytes, which has no CPU kernels and is not installed on the lent GPU machine.

    python benchmarks/quantization.py                    # CPU: bytes, decode (17m, 150m x 1, 16), engine
    python benchmarks/quantization.py --record
    python benchmarks/quantization.py --sizes 1b --batches 1 64     # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import cpu_model, report
from flax import nnx

import ettin_jax as ej
from ettin_jax import convert
from ettin_jax.cache import init_cache

# Datasheet HBM bandwidth, bytes/s, by device-name fragment (first match wins).
HBM = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}


def nbytes(tree) -> int:
    return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def param_bytes(size: str, quantization: str | None, dtype) -> int:
    config = ej.ModernBertDecoderConfig.ettin(size, quantization=quantization)
    model = nnx.eval_shape(lambda: ej.ModernBertDecoderForCausalLM(config, dtype=dtype, param_dtype=dtype))
    return nbytes(nnx.state(model, nnx.Param))


def part_bytes(rows: list[str]) -> None:
    rows += ["| shape | float32 | bfloat16 | int8 weights | int8 / bfloat16 |", "|---|---|---|---|---|"]
    for size in ej.config.ETTIN_SIZES:
        f32, bf16 = param_bytes(size, None, jnp.float32), param_bytes(size, None, jnp.bfloat16)
        int8 = param_bytes(size, "int8", jnp.bfloat16)
        rows.append(
            f"| {size} | {f32 / 2**20:.1f} MiB | {bf16 / 2**20:.1f} MiB | {int8 / 2**20:.1f} MiB | {int8 / bf16:.3f} |"
        )


def models(size: str, gpu: bool) -> dict:
    """name -> model: float32 (CPU only), bfloat16 weights, int8 weights; same random weights."""
    config = ej.ModernBertDecoderConfig.ettin(size)
    compute = jnp.bfloat16 if gpu else jnp.float32
    bf16 = ej.ModernBertDecoderForCausalLM(config, dtype=compute, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    if gpu:
        return {"bfloat16": bf16, "int8": convert.quantize_model(bf16)}
    f32 = ej.ModernBertDecoderForCausalLM(config, dtype=compute, rngs=nnx.Rngs(0))
    return {"float32": f32, "bfloat16": bf16, "int8": convert.quantize_model(f32)}


def generate_seconds(model, ids: np.ndarray, new: int, repeats: int) -> float:
    def run():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        np.asarray(out)

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def part_decode(args, gpu: bool, rows: list[str]) -> None:
    peak = next((v for k, v in HBM.items() if k in jax.devices()[0].device_kind), None) if gpu else None
    head = "| shape | batch | weights | decode tok/s | ms / step | vs bfloat16 | vs float32 |"
    if peak:
        head += " bytes / step | HBM roofline |"
    rows += [head, "|" + "---|" * (head.count("|") - 1)]
    rng = np.random.default_rng(0)
    for size in args.sizes:
        built = models(size, gpu)
        for batch in args.batches:
            ids = rng.integers(5, 50000, (batch, args.prompt)).astype(np.int32)
            step = {}
            for name, model in built.items():
                long, short = (generate_seconds(model, ids, n, args.repeats) for n in (args.new, args.short))
                step[name] = (long - short) / (args.new - args.short)
            for name, model in built.items():
                vs_f32 = f"{step['float32'] / step[name]:.2f}x" if "float32" in step else "-"
                row = (
                    f"| {size} | {batch} | {name} | {batch / step[name]:.1f} | {1e3 * step[name]:.2f} | "
                    f"{step['bfloat16'] / step[name]:.2f}x | {vs_f32} |"
                )
                if peak:
                    cache = jax.eval_shape(
                        lambda m=model, b=batch: init_cache(m.config, b, args.prompt + args.new, jnp.bfloat16)
                    )
                    moved = nbytes(nnx.state(model, nnx.Param)) + nbytes(cache)
                    row += f" {moved / 2**20:.0f} MiB | {moved / step[name] / peak:.1%} |"
                rows.append(row)
                print(row, flush=True)
        del built


def part_matmul(args, rows: list[str]) -> None:
    import qwix

    from ettin_jax.quantization import Int8Kernel, matmul, quantize

    rows += [
        "| x @ W | bf16 | int8 (ours: scales after) | int8 dequantized first | qwix.dot_general |",
        "|---|---|---|---|---|",
    ]
    rng = np.random.default_rng(0)
    for batch, d_in, d_out in ((1, 1792, 7680), (1, 1792, 50368), (64, 1792, 7680)):
        x = jnp.asarray(rng.standard_normal((batch, d_in)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((d_in, d_out)) * 0.02, jnp.float32)
        q, s = quantize(w, -1)
        kernel = Int8Kernel(q, s.astype(jnp.bfloat16))
        qarray = qwix.quantize(w.astype(jnp.bfloat16), jnp.int8, channelwise_axes=(1,))
        sides = {
            "bf16": (jax.jit(lambda x, w: x @ w), (x, w.astype(jnp.bfloat16))),
            "ours": (jax.jit(lambda x, k: matmul(x, k, jnp.bfloat16)), (x, kernel)),
            "first": (jax.jit(lambda x, k: x @ (k.q.astype(jnp.bfloat16) * k.scale)), (x, kernel)),
            "qwix": (jax.jit(lambda x, a: qwix.dot_general(x, a, (((1,), (0,)), ((), ())))), (x, qarray)),
        }
        micro = {}
        for name, (fn, operands) in sides.items():
            fn(*operands).block_until_ready()
            start = time.perf_counter()
            for _ in range(200):
                out = fn(*operands)
            out.block_until_ready()
            micro[name] = (time.perf_counter() - start) / 200 * 1e6
        rows.append(
            f"| ({batch}, {d_in}) @ ({d_in}, {d_out}) | {micro['bf16']:.1f} us | {micro['ours']:.1f} us | "
            f"{micro['first']:.1f} us | {micro['qwix']:.1f} us |"
        )
        print(rows[-1], flush=True)


def part_engine(args, gpu: bool, rows: list[str]) -> None:
    rows += [
        "| shape | requests | KV cache | tok/s | vs compute dtype | outputs equal to compute-dtype cache |",
        "|---|---|---|---|---|---|",
    ]
    size = args.engine_size
    config = ej.ModernBertDecoderConfig.ettin(size)
    compute = jnp.bfloat16 if gpu else jnp.float32
    model = ej.ModernBertDecoderForCausalLM(config, dtype=compute, param_dtype=compute, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    lengths = np.exp(rng.uniform(np.log(8), np.log(args.engine_max_prompt), args.requests)).astype(int)
    prompts = [rng.integers(5, 50000, n).tolist() for n in lengths]
    results, rates = {}, {}
    for kv in ("auto", "int8"):
        model.set_kv_cache_dtype(kv)
        kwargs = dict(max_new_tokens=args.engine_new, max_batch_size=args.engine_batch, do_sample=False)
        model.generate_batch(prompts, **kwargs)  # compiles every width it passes through
        start = time.perf_counter()
        results[kv] = model.generate_batch(prompts, **kwargs)
        seconds = time.perf_counter() - start
        rates[kv] = sum(map(len, results[kv])) / seconds
    same = sum(a == b for a, b in zip(results["auto"], results["int8"], strict=True))
    for kv in ("auto", "int8"):
        rows.append(
            f"| {size} | {args.requests} | {kv} | {rates[kv]:.1f} | {rates[kv] / rates['auto']:.2f}x | "
            f"{'-' if kv == 'auto' else f'{same} of {args.requests}'} |"
        )
        print(rows[-1], flush=True)


def main() -> None:
    gpu = jax.default_backend() == "gpu"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["bytes", "decode", "engine"] + (["matmul"] if gpu else []))
    parser.add_argument("--sizes", nargs="+", default=["1b"] if gpu else ["17m", "150m"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64] if gpu else [1, 16])
    parser.add_argument("--prompt", type=int, default=128 if gpu else 32)
    parser.add_argument("--new", type=int, default=256 if gpu else 64)
    parser.add_argument("--short", type=int, default=32 if gpu else 8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine-size", default="150m" if gpu else "17m")
    parser.add_argument("--requests", type=int, default=256 if gpu else 48)
    parser.add_argument("--engine-batch", type=int, default=64 if gpu else 16)
    parser.add_argument("--engine-new", type=int, default=256 if gpu else 48)
    parser.add_argument("--engine-max-prompt", type=int, default=512 if gpu else 128)
    parser.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = parser.parse_args()
    device = jax.devices()[0].device_kind if gpu else f"{cpu_model()}, {os.cpu_count()} cores"
    rows = [
        f"\n### quantization, {datetime.date.today()}, {device}, {platform.machine()}\n",
        f"jax {jax.__version__} ({jax.default_backend()}); greedy; decode rate = batch / per-step time, the "
        f"difference of {args.new}- and {args.short}-token generate calls (EOS blocked), median of "
        f"{args.repeats}; prompt {args.prompt} tokens. `python {' '.join(sys.argv)}`\n",
    ]
    parts = {
        "bytes": lambda: part_bytes(rows),
        "decode": lambda: part_decode(args, gpu, rows),
        "matmul": lambda: part_matmul(args, rows),
        "engine": lambda: part_engine(args, gpu, rows),
    }
    for name in args.parts:
        rows.append("")
        parts[name]()
    report("\n".join(rows) + "\n", args.record)


if __name__ == "__main__":
    main()
