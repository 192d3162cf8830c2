"""Bulk sampling throughput (issue 18): many prompts of different lengths, each stopping at its
own EOS, through four samplers in one run, on the same random weights.

The workload: `--requests` prompts of random ids whose lengths are log-uniform in
[`--min-prompt`, `--max-prompt`], greedy decoding, at most `--max-new` new tokens. A bias
added to the EOS logit (`decoder.bias[eos]`) makes EOS the argmax at data-dependent steps, so
outputs run from 1 token to the cap (the script prints their distribution). The sides:
- engine: `ettin_jax.engine.Engine` (continuous batching; what `model.generate_batch` runs),
  with its slot utilisation (useful slot-steps over slot-steps) and its time split;
- static: our `model.generate` in batches of `--batch` prompts sorted by length, each row cut
  at its EOS;
- hf-batch: transformers' continuous batching, `model.generate_batch`;
- hf-static: transformers' `generate` in the same sorted batches.

Tokens/s counts each request's new tokens through its EOS over the wall time of the whole
workload. Compilation and warm-up are not in it: the JAX sides run the whole workload once first
(compiling every width they pass through; that first run is reported), transformers a few
requests. Every side's tokens are compared, request by
request, with transformers' `generate` (float32 greedy: they should all agree).

    python benchmarks/throughput.py                           # the defaults, all four sides
    python benchmarks/throughput.py --sides engine --max-batch-size 16 32 64 --steps-per-call 4 8 16
    python benchmarks/throughput.py --record                  # and append the table to RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import sys
import tempfile
import time

import numpy as np
from common import cpu_model, eos_biased_checkpoint, report

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SIDES = ("engine", "static", "hf-batch", "hf-static")


def workload(args) -> list[list[int]]:
    rng = np.random.default_rng(args.seed)
    lengths = np.exp(rng.uniform(np.log(args.min_prompt), np.log(args.max_prompt + 1), args.requests)).astype(int)
    lengths = np.clip(lengths, args.min_prompt, args.max_prompt)
    return [rng.integers(0, 50000, n).tolist() for n in lengths]


def cut(row, eos: int, cap: int) -> list[int]:
    """New tokens through the first EOS (included), at most `cap`."""
    row = [int(t) for t in row[:cap]]
    return row[: row.index(eos) + 1] if eos in row else row


def sorted_batches(prompts: list[list[int]], size: int) -> list[list[int]]:
    """Indices of `prompts` by length, in groups of `size`."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]


def build(size: str, bias: float, directory: str, dtype: str, device: str):
    """A transformers model with random weights (seed 0) and `bias` on the EOS logit, saved to
    `directory`, and ours loaded from it; both in `dtype`, the reference on torch `device`."""
    import jax.numpy as jnp
    import torch

    import ettin_jax as ej

    reference, eos = eos_biased_checkpoint(size, bias, directory)
    reference = reference.to(device=device, dtype=getattr(torch, dtype))
    ours = ej.ModernBertDecoderForCausalLM.from_pretrained(
        directory, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype)
    )
    return reference, ours, eos


def run_engine(model, prompts, eos, max_new, settings: dict, max_length: int) -> tuple[list[list[int]], dict]:
    from ettin_jax.engine import Engine

    start = time.perf_counter()
    engine = Engine(model, max_length=max_length, max_queue=len(prompts), **settings)
    requests = [engine.submit(p, max_new_tokens=max_new, eos_token_id=eos) for p in prompts]
    engine.run()
    wall = time.perf_counter() - start
    errors = [r.error for r in requests if r.error]
    if errors:
        raise RuntimeError(f"engine: {errors[0]}")
    info = dict(engine.stats, utilisation=engine.utilisation(), wall=wall, batch=engine.batch)
    return [list(r.tokens) for r in requests], info


def run_static(model, prompts, eos, max_new, batch: int) -> tuple[list[list[int]], dict]:
    outputs: list = [None] * len(prompts)
    slot_steps = 0
    start = time.perf_counter()
    for group in sorted_batches(prompts, batch):
        out = model.generate([prompts[i] for i in group], max_new_tokens=max_new, eos_token_id=eos)
        width = max(len(prompts[i]) for i in group)
        for row, i in zip(out, group, strict=True):
            outputs[i] = cut(row[width:], eos, max_new)
        slot_steps += len(group) * max(len(outputs[i]) for i in group)
    wall = time.perf_counter() - start
    return outputs, {"wall": wall, "utilisation": sum(map(len, outputs)) / slot_steps}


def run_hf_batch(reference, prompts, eos, max_new) -> tuple[list[list[int]], dict]:
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    start = time.perf_counter()
    with torch.no_grad():
        results = reference.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    wall = time.perf_counter() - start
    outputs = [list(r.generated_tokens) for r in results.values()]
    if len(outputs) != len(prompts) or any(r.error for r in results.values()):
        raise RuntimeError("transformers generate_batch lost or failed requests")
    return [cut(o, eos, max_new) for o in outputs], {"wall": wall}


def run_hf_static(reference, prompts, eos, max_new, batch: int) -> tuple[list[list[int]], dict]:
    import torch

    outputs: list = [None] * len(prompts)
    slot_steps = 0
    start = time.perf_counter()
    for group in sorted_batches(prompts, batch):
        width = max(len(prompts[i]) for i in group)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.no_grad():
            out = reference.generate(
                ids.to(reference.device),
                attention_mask=mask.to(reference.device),
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        for row, i in zip(out, group, strict=True):
            outputs[i] = cut(row[width:].tolist(), eos, max_new)
        slot_steps += len(group) * max(len(outputs[i]) for i in group)
    wall = time.perf_counter() - start
    return outputs, {"wall": wall, "utilisation": sum(map(len, outputs)) / slot_steps}


# ---- the run --------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="17m")
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--min-prompt", type=int, default=8)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--max-new", type=int, default=256)
    parser.add_argument("--eos-bias", type=float, default=0.65, help="added to the EOS logit (median output ~30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32, help="rows per static batch")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--max-batch-size", nargs="+", type=int, default=[None], help="engine slots (several: a sweep)")
    parser.add_argument("--steps-per-call", nargs="+", type=int, default=[None])
    parser.add_argument("--prefill-chunk", nargs="+", type=int, default=[None])
    parser.add_argument("--prefill-batch", nargs="+", type=int, default=[None])
    parser.add_argument("--max-length", type=int, help="engine max_length (default: as generate_batch picks)")
    parser.add_argument("--profile", help="write a cProfile of the (last) timed engine run to this file")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="both sides' dtype")
    parser.add_argument("--torch-device", default="cpu", help="where transformers runs (cuda on a GPU machine)")
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    from ettin_jax import engine as engine_module
    from ettin_jax.padding import bucket

    prompts = workload(args)
    with tempfile.TemporaryDirectory() as directory:
        reference, model, eos = build(args.size, args.eos_bias, directory, args.dtype, args.torch_device)
    max_length = args.max_length or min(model.config.max_position_embeddings, bucket(args.max_prompt + args.max_new))
    print(f"{args.size}, {len(prompts)} requests, prompt lengths {min(map(len, prompts))}..{max(map(len, prompts))} "
          f"(median {int(np.median([len(p) for p in prompts]))}), EOS {eos} bias {args.eos_bias}", flush=True)  # fmt: skip

    results: dict[str, tuple[list[list[int]], dict]] = {}
    rows = []  # (side, settings, tokens, wall, first wall or None, info)
    if "hf-static" in args.sides:
        run_hf_static(reference, prompts[:8], eos, args.max_new, args.batch)  # warm-up
        results["hf-static"] = run_hf_static(reference, prompts, eos, args.max_new, args.batch)
    if "hf-batch" in args.sides:
        run_hf_batch(reference, prompts[:8], eos, args.max_new)
        results["hf-batch"] = run_hf_batch(reference, prompts, eos, args.max_new)
    if "static" in args.sides:
        first = run_static(model, prompts, eos, args.max_new, args.batch)[1]["wall"]
        outputs, info = run_static(model, prompts, eos, args.max_new, args.batch)
        results["static"] = outputs, dict(info, first=first)
    reference_side = next((s for s in ("hf-static", "hf-batch", "static") if s in results), None)
    if "engine" in args.sides:
        grid = itertools.product(args.max_batch_size, args.steps_per_call, args.prefill_chunk, args.prefill_batch)
        for slots, steps, chunk, group in grid:
            names = ("max_batch_size", "steps_per_call", "prefill_chunk", "prefill_batch")
            settings = {k: v for k, v in zip(names, (slots, steps, chunk, group), strict=True) if v is not None}
            # The warm-up is the workload itself: it compiles every prefill width and every decode
            # width the stream passes through as it fills and drains the slots.
            start = time.perf_counter()
            run_engine(model, prompts, eos, args.max_new, settings, max_length)
            first = time.perf_counter() - start
            before = engine_module.compiled_programs()
            profiler = None
            if args.profile:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            outputs, info = run_engine(model, prompts, eos, args.max_new, settings, max_length)
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(args.profile)
            info.update(first=first, compiled=engine_module.compiled_programs() - before)
            results[f"engine {settings}"] = outputs, info

    lengths = np.array([len(o) for o in next(iter(results.values()))[0]]) if results else np.array([0])
    pct = np.percentile(lengths, [0, 10, 25, 50, 75, 90, 100]).astype(int).tolist()
    capped = int(np.sum(lengths >= args.max_new))
    print(f"output lengths: min/p10/p25/median/p75/p90/max {pct}, at the cap {capped}, total {lengths.sum()}")

    hf_rate = None
    if "hf-batch" in results:
        out, info = results["hf-batch"]
        hf_rate = sum(map(len, out)) / info["wall"]
    for name, (out, info) in results.items():
        tokens = sum(map(len, out))
        rate = tokens / info["wall"]
        same = "-"
        if reference_side is not None:
            ref = results[reference_side][0]
            same = f"{sum(a == b for a, b in zip(out, ref, strict=True))}/{len(out)}"
        host = ""
        if "host_s" in info:
            spent = info["host_s"] + info["device_s"] + info["prefill_s"]
            host = (f"host share {info['host_s'] / spent:.1%} (host {info['host_s']:.2f} s, decode "
                    f"{info['device_s']:.1f} s, prefill {info['prefill_s']:.1f} s), {info['rounds']} rounds, "
                    f"{info['batch']} slots, {info['compiled']} compiles in the timed run")  # fmt: skip
        rows.append((name, tokens, info, rate, same, host))
        ratio = f"{rate / hf_rate:.2f}x" if hf_rate else "-"
        util = f"{info['utilisation']:.0%}" if "utilisation" in info else "-"
        first = f", warm-up {info['first']:.1f} s" if "first" in info else ""
        print(f"{name:>50}: {tokens} tokens in {info['wall']:6.1f} s = {rate:7.1f} tok/s ({ratio} hf-batch), "
              f"utilisation {util}, same as {reference_side} {same}{first}", flush=True)  # fmt: skip
        if host:
            print(f"{'':>50}  {host}")

    machine = f"{cpu_model()}, {os.cpu_count()} cores, {platform.machine()}"
    if jax.default_backend() == "gpu":
        machine = f"{jax.devices()[0].device_kind}, {machine}"
    header = (
        f"\n### throughput, {datetime.date.today()}, {machine}\n\n"
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, transformers "
        f"{transformers.__version__}; `python benchmarks/throughput.py` {' '.join(sys.argv[1:])}: {args.size} shape, "
        f"{args.dtype} (transformers on {args.torch_device}), greedy, {args.requests} requests, prompts {args.min_prompt} to {args.max_prompt} tokens "
        f"(log-uniform), at most {args.max_new} new tokens, EOS bias {args.eos_bias}: output lengths "
        f"min/p10/p25/median/p75/p90/max {pct}. Tokens/s: new tokens through EOS over the workload's wall time, "
        f"after a warm-up; static batches of {args.batch}, sorted by length. Warm-up (compiling): each JAX side runs "
        "the whole workload once first.\n\n"
        f"| side | tokens/s | vs hf-batch | utilisation | same tokens as {reference_side} | warm-up (s) | notes |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n"
    )
    table = ""
    for name, _tokens, info, rate, same, host in rows:
        ratio = f"{rate / hf_rate:.2f}x" if hf_rate else "-"
        util = f"{info['utilisation']:.0%}" if "utilisation" in info else "-"
        first = f"{info['first']:.1f}" if "first" in info else "-"
        table += f"| {name} | {rate:.1f} | {ratio} | {util} | {same} | {first} | {host} |\n"
    report(header + table, args.record)


if __name__ == "__main__":
    sys.exit(main())
