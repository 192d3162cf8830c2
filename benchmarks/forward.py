"""Causal-LM forward pass (logits), ettin-jax against transformers (sdpa), side by side in one
process, on the same random weights and tokens.

Reports the time of each, the ratio, the CPU's measured float32 matmul peak, and the fraction
of that peak our forward reaches (model FLOPs, `ettin_jax.platforms.model_flops`: the matmuls a
forward must do, counting causal attention over the keys each query actually sees: T/2 on average
on global layers, at most the window on sliding ones). Each side runs once untimed first; times
are medians.

    python benchmarks/forward.py                          # 150m at 4x512 and 1x4096, 17m at 4x512
    python benchmarks/forward.py --impls xla xla_blocked  # compare our backends
    python benchmarks/forward.py --record                 # append the table to RESULTS.md

On a GPU machine: `python benchmarks/forward.py --device gpu --dtype bfloat16 --impls cudnn xla`
(transformers then runs on CUDA with sdpa).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

import numpy as np
from common import cpu_model, measure, report

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def matmul_peak(dtype: str, repeats: int = 5) -> float:
    """FLOP/s of a jitted 4096^3 matmul: the most this machine's XLA matmul does."""
    import jax
    import jax.numpy as jnp

    n = 4096
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / measure(lambda: f(a).block_until_ready(), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["150m:4x512", "150m:1x4096", "17m:4x512", "17m:1x4096"])
    parser.add_argument("--impls", nargs="+", default=["xla_blocked", "xla"])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import transformers
    from flax import nnx

    import ettin_jax as ej
    from ettin_jax import compilation
    from ettin_jax.platforms import model_flops

    dtype = jnp.dtype(args.dtype)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch_device = "cuda" if args.device == "gpu" else "cpu"
    peak = matmul_peak(args.dtype)
    print(f"measured {args.dtype} matmul peak: {peak / 1e9:.1f} GFLOP/s (jax, 4096^3)", flush=True)
    rows = []
    models = {}
    for shape in args.shapes:
        size, dims = shape.split(":")
        batch, length = (int(x) for x in dims.split("x"))
        if size not in models:
            config = ej.ModernBertDecoderConfig.ettin(size)
            torch.manual_seed(0)
            reference = transformers.ModernBertDecoderForCausalLM(
                transformers.ModernBertDecoderConfig(
                    **{k: v for k, v in config.to_dict().items() if k != "model_type"}, attn_implementation="sdpa"
                )
            ).eval()
            with tempfile.TemporaryDirectory() as directory:
                reference.save_pretrained(directory)
                model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory, dtype=dtype)
            models[size] = (config, model, reference.to(device=torch_device, dtype=torch_dtype))
        config, model, reference = models[size]
        ids = np.random.default_rng(0).integers(0, 50000, size=(batch, length)).astype(np.int32)
        ids_t = torch.tensor(ids, dtype=torch.long, device=torch_device)

        def theirs(reference=reference, ids_t=ids_t):
            with torch.no_grad():
                out = reference(input_ids=ids_t).logits
                if torch_device == "cuda":
                    torch.cuda.synchronize()
                return out

        t_theirs = measure(theirs, args.repeats)
        expected = theirs().float().cpu().numpy()
        flops = model_flops(config, batch, length)
        for impl in args.impls:
            model.set_attention_impl(impl)
            graphdef, state = nnx.split(model)

            # Jitted as the library jits its own programs (with its XLA:CPU options).
            @compilation.jit
            def forward(state, ids, graphdef=graphdef):
                return nnx.merge(graphdef, state)(ids).logits

            def ours(forward=forward, state=state, ids=ids):
                return forward(state, ids).block_until_ready()

            t_ours = measure(ours, args.repeats)
            diff = float(np.max(np.abs(np.asarray(ours(), np.float32) - expected)))
            row = (shape, impl, t_theirs, t_ours, t_theirs / t_ours, flops / t_ours / peak, diff)
            rows.append(row)
            print(f"{shape:>12} {impl:>11}: transformers {t_theirs:7.3f} s, ettin-jax {t_ours:7.3f} s, "
                  f"ratio {t_theirs / t_ours:5.2f}x, {100 * row[5]:5.1f}% of peak, max |logit diff| {diff:.1e}",
                  flush=True)  # fmt: skip

    device = str(jax.devices()[0].device_kind) if args.device == "gpu" else f"{cpu_model()}, {os.cpu_count()} cores"
    header = (
        f"\n### forward, {datetime.date.today()}, {device}\n\n"
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} ({torch_device}, sdpa), "
        f"transformers {transformers.__version__}; {args.dtype}, causal-LM logits, median of {args.repeats} after a "
        f"warm-up. Measured matmul peak {peak / 1e9:.1f} GFLOP/s.\n"
        f"Command: `python benchmarks/forward.py {' '.join(sys.argv[1:])}`\n\n"
        "| shape | ettin-jax attention | transformers s | ettin-jax s | ratio | fraction of peak | max logit diff |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n"
    )
    table = "".join(
        f"| {s} | {i} | {t:.3f} | {o:.3f} | {r:.2f}x | {100 * p:.1f}% | {d:.1e} |\n" for s, i, t, o, r, p, d in rows
    )
    report(header + table, args.record)


if __name__ == "__main__":
    sys.exit(main())
