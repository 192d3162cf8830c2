"""The GPU benchmarks in one command: ettin-jax against transformers (sdpa) on the same GPU, in
one process, in bfloat16.

- forward: causal-LM logits; time, ratio, and model FLOPs utilisation (MFU);
- train: one AdamW step, bf16 compute on float32 master weights (transformers: torch.autocast
  and fused AdamW); MFU counts 3x the forward's FLOPs (no remat recompute);
- generate: greedy, tokens/s at batch 1 and 64, every row making exactly `--new` tokens;
- memory: an 8k-token prefill of the 1b shape (JAX's peak bytes in use on the GPU), and the KV
  cache bytes per token of each library, with sliding layers holding a window of slots.

MFU is model FLOPs over time over the device's dense bf16 peak from its datasheet
(`ettin_jax.platforms.peak_flops`: 989.4 TFLOP/s for H100 SXM and H200; the measured rate where
the table lacks the device); the measured 8192^3 matmul rate is printed beside it. Model FLOPs
(`ettin_jax.platforms.model_flops`) count the matmuls and causal attention over the keys each
query sees (T/2 on global layers, at most the window on sliding ones).

    python benchmarks/gpu.py                                  # every part, every size
    python benchmarks/gpu.py --parts forward train --sizes 150m --lengths 2048
    python benchmarks/gpu.py --record                         # append the tables to RESULTS.md

Train steps run `--train-tokens` per batch (default 8192): at 16k, the 400m and 1b steps of
the two libraries did not fit on an 80 GB H100 together. The 1b step does not fit beside
PyTorch's even at 8k; time each library in its own process (the ratio is then across two runs):

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 python benchmarks/gpu.py --parts train --sizes 1b --sides ettin-jax
    python benchmarks/gpu.py --parts train --sizes 1b --sides transformers

JAX takes at most `XLA_PYTHON_CLIENT_MEM_FRACTION` of the GPU (default here 0.45, allocated as
needed), so that PyTorch has the rest. Without a GPU it runs on the CPU (slowly; for a dry run
use `--sizes 17m --lengths 64 --tokens 128 --train-tokens 128 --gen-sizes 17m --gen-batches 2 --new 8
--prompt 16 --memory-size 17m --memory-length 256 --repeats 2`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from common import measure, report
from flax import nnx

import ettin_jax as ej
from ettin_jax import compilation
from ettin_jax.cache import init_cache
from ettin_jax.platforms import model_flops, peak_flops
from ettin_jax.train.optim import OptimizerConfig, make_optimizer
from ettin_jax.train.steps import create_train_state, train_step

GiB = 2**30


def build(size: str, torch_device: str, param_dtype: Any):
    """A random transformers causal LM of the Ettin `size` shape and ettin-jax's copy of it, read
    back from its bf16 safetensors with bf16 compute and `param_dtype` params; returns (our
    config, the torch model in float32 on the device, our model)."""
    config = ej.ModernBertDecoderConfig.ettin(size)
    hf_config = transformers.ModernBertDecoderConfig(
        **{k: v for k, v in config.to_dict().items() if k != "model_type"}, attn_implementation="sdpa"
    )
    torch.manual_seed(0)
    with torch.device(torch_device):
        reference = transformers.ModernBertDecoderForCausalLM(hf_config)
    with tempfile.TemporaryDirectory() as directory:
        reference.to(torch.bfloat16).save_pretrained(directory)
        model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory, dtype=jnp.bfloat16, param_dtype=param_dtype)
    return config, reference.float(), model


def sync(torch_device: str) -> None:

    if torch_device == "cuda":
        torch.cuda.synchronize()


def part_forward(args, sizes, lengths, torch_device, peak, rows):

    for size in sizes:
        config, reference, model = build(size, torch_device, jnp.bfloat16)
        reference = reference.to(torch.bfloat16).eval()
        graphdef, state = nnx.split(model)

        @compilation.jit
        def forward(state, ids, graphdef=graphdef):
            return nnx.merge(graphdef, state)(ids).logits

        for length in lengths:
            batch = max(args.tokens // length, 1)
            ids = np.random.default_rng(0).integers(0, 50000, size=(batch, length)).astype(np.int32)
            ids_j, ids_t = jax.device_put(ids), torch.tensor(ids, dtype=torch.long, device=torch_device)

            def theirs(ids_t=ids_t, reference=reference):
                with torch.no_grad():
                    out = reference(input_ids=ids_t).logits
                sync(torch_device)
                return out

            def ours(ids_j=ids_j, state=state):
                return forward(state, ids_j).block_until_ready()

            t_theirs, t_ours = measure(theirs, args.repeats), measure(ours, args.repeats)
            ref = theirs()[:, -1].float().cpu().numpy()
            diff = float(np.max(np.abs(np.asarray(ours()[:, -1], np.float32) - ref)))
            flops = model_flops(config, batch, length)
            rows.append(("forward", size, f"{batch}x{length}", t_theirs, t_ours, flops / t_ours / peak,
                         flops / t_theirs / peak, f"last-token logits max diff {diff:.2f}"))  # fmt: skip
            print(f"forward {size} {batch}x{length}: transformers {t_theirs * 1e3:.1f} ms, ettin-jax "
                  f"{t_ours * 1e3:.1f} ms, ratio {t_theirs / t_ours:.2f}x, MFU {100 * flops / t_ours / peak:.1f}% "
                  f"vs {100 * flops / t_theirs / peak:.1f}%; max |last logit diff| {diff:.2f}", flush=True)  # fmt: skip
        del model, state, reference
        torch.cuda.empty_cache() if torch_device == "cuda" else None


def part_train(args, sizes, lengths, torch_device, peak, rows):

    tx = make_optimizer(OptimizerConfig(learning_rate=1e-4, schedule="constant", weight_decay=0.01, max_grad_norm=None))
    for size in sizes:
        for length in lengths:
            batch = max(args.train_tokens // length, 1)
            config, reference, model = build(size, torch_device, jnp.float32)
            model.model.remat = args.remat
            reference.config.use_cache = False
            reference.train()
            holder = {"state": create_train_state(model, tx, seed=0)}
            del model
            ids = np.random.default_rng(0).integers(0, 50000, size=(batch, length))
            data = {"input_ids": jnp.asarray(ids[None], jnp.int32), "attention_mask": jnp.ones((1, batch, length), jnp.int32),
                    "labels": jnp.asarray(ids[None], jnp.int32)}  # fmt: skip
            key = jax.random.PRNGKey(0)

            def ours(holder=holder, data=data, key=key):
                state, metrics = train_step(holder["state"], data, key)
                holder["state"] = state
                jax.block_until_ready((state, metrics))
                return float(metrics["loss"])

            decay = [p for p in reference.parameters() if p.ndim >= 2]
            rest = [p for p in reference.parameters() if p.ndim < 2]
            fused = torch_device == "cuda"
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                    lr=1e-4, fused=fused)  # fmt: skip
            ids_t = torch.tensor(ids, device=torch_device)

            def theirs(reference=reference, opt=opt, ids_t=ids_t):
                with torch.autocast(torch_device, dtype=torch.bfloat16):
                    loss = reference(input_ids=ids_t, labels=ids_t).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.item()

            try:
                nan = lambda: float("nan")  # noqa: E731
                ours, theirs = (
                    (ours if args.sides != "transformers" else nan),
                    (theirs if args.sides != "ettin-jax" else nan),
                )
                first = (ours(), theirs())
                t_ours, t_theirs = measure(ours, args.repeats), measure(theirs, args.repeats)
                t_ours = float("nan") if args.sides == "transformers" else t_ours
                t_theirs = float("nan") if args.sides == "ettin-jax" else t_theirs
            except Exception as e:  # out of memory on one side: a result, not a crash
                print(f"train {size} {batch}x{length}: failed: {str(e).splitlines()[0][:200]}", flush=True)
                rows.append(("train", size, f"{batch}x{length}", float("nan"), float("nan"), 0.0, 0.0,
                             f"failed: {str(e).splitlines()[0][:120]}"))  # fmt: skip
            else:
                flops = model_flops(config, batch, length, training=True)
                note = f"first loss {first[0]:.4f} vs {first[1]:.4f}" + (", remat" if args.remat else "")
                rows.append(("train", size, f"{batch}x{length}", t_theirs, t_ours, flops / t_ours / peak,
                             flops / t_theirs / peak, note))  # fmt: skip
                print(f"train {size} {batch}x{length}: transformers {t_theirs * 1e3:.1f} ms, ettin-jax "
                      f"{t_ours * 1e3:.1f} ms, ratio {t_theirs / t_ours:.2f}x, MFU {100 * flops / t_ours / peak:.1f}% "
                      f"vs {100 * flops / t_theirs / peak:.1f}%; {note}", flush=True)  # fmt: skip
            del holder, reference, opt, data
            if torch_device == "cuda":
                torch.cuda.empty_cache()


def part_generate(args, sizes, torch_device, rows):

    for size in sizes:
        _, reference, model = build(size, torch_device, jnp.bfloat16)
        reference = reference.to(torch.bfloat16).eval()
        for batch in args.gen_batches:
            prompts = np.random.default_rng(0).integers(0, 50000, size=(batch, args.prompt))
            prompts_t = torch.tensor(prompts, device=torch_device)

            def ours(prompts=prompts, model=model):
                return model.generate(prompts, max_new_tokens=args.new, eos_token_id=[])

            def theirs(prompts_t=prompts_t, reference=reference):
                with torch.no_grad():
                    out = reference.generate(
                        prompts_t, attention_mask=torch.ones_like(prompts_t), max_new_tokens=args.new,
                        min_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0,
                    )  # fmt: skip
                sync(torch_device)
                return out

            t_ours, t_theirs = measure(ours, args.repeats), measure(theirs, args.repeats)
            a, b = ours()[:, args.prompt :], theirs()[:, args.prompt :].cpu().numpy()
            same = float(np.mean(np.cumprod(a == b, axis=1).sum(axis=1))) / args.new  # agreeing prefix
            tokens = batch * args.new
            rows.append(("generate", size, f"batch {batch}", t_theirs, t_ours, tokens / t_ours, tokens / t_theirs,
                         f"prompt {args.prompt}, {args.new} new; tokens agree for {100 * same:.0f}% of each row "
                         "before the first bf16 divergence"))  # fmt: skip
            print(f"generate {size} batch {batch}: transformers {tokens / t_theirs:.0f} tok/s, ettin-jax "
                  f"{tokens / t_ours:.0f} tok/s, ratio {t_theirs / t_ours:.2f}x; same-prefix {100 * same:.0f}%",
                  flush=True)  # fmt: skip
        del model, reference
        if torch_device == "cuda":
            torch.cuda.empty_cache()


def part_memory(args, torch_device, rows):

    size = args.memory_size
    config, reference, model = build(size, torch_device, jnp.bfloat16)
    reference = reference.to(torch.bfloat16).eval()
    # The longest prompt that leaves room for 16 new tokens (8176 for the Ettin shapes).
    length = min(args.memory_length or config.max_position_embeddings, config.max_position_embeddings) - 16
    prompt = np.random.default_rng(0).integers(0, 50000, size=(1, length))
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=16, eos_token_id=[])
    first = time.perf_counter() - start
    seconds = measure(lambda model=model: model.generate(prompt, max_new_tokens=16, eos_token_id=[]), args.repeats)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    cache = jax.eval_shape(lambda: init_cache(config, 1, length, jnp.bfloat16))
    ours = sum(x.size * x.dtype.itemsize for c in cache.layers for x in (c.k, c.v)) / length
    with torch.no_grad():
        past = reference(input_ids=torch.tensor(prompt, device=torch_device), use_cache=True).past_key_values
    theirs = sum(t.numel() * t.element_size() for layer in past.layers for t in (layer.keys, layer.values)) / length
    full = 2 * config.num_hidden_layers * config.hidden_size * 2  # every layer, every position, bf16
    peak_text = "n/a" if peak is None else f"{peak / GiB:.2f} GiB"
    rows.append(("memory", size, f"prefill {length} + 16 new", float("nan"), seconds, ours, theirs,
                 f"JAX peak bytes in use over the process so far (memory runs first by default) {peak_text}; "
                 f"first call (compiles) {first:.1f} s; "
                 f"KV bytes/token at {length} tokens: ettin-jax {ours:.0f}, transformers {theirs:.0f}, "
                 f"all layers full {full}"))  # fmt: skip
    print(
        f"memory {size} prefill {length}: generate {seconds:.3f} s (first {first:.1f} s), JAX peak {peak_text}; "
        f"KV bytes/token ettin-jax {ours:.0f}, transformers {theirs:.0f}, all layers full {full}",
        flush=True,
    )
    del model, reference, past
    if torch_device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["memory", "generate", "forward", "train"],
                        choices=("memory", "generate", "forward", "train"))  # fmt: skip
    parser.add_argument("--sizes", nargs="+", default=["150m", "400m", "1b"], help="forward and train")
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per forward batch (batch = tokens / length)")
    parser.add_argument("--train-tokens", type=int, default=8192, help="tokens per train batch")
    parser.add_argument("--sides", default="both", choices=("both", "ettin-jax", "transformers"),
                        help="train: time one library only, where both do not fit on the GPU at once")  # fmt: skip
    parser.add_argument("--remat", action="store_true", help="train with remat per layer")
    parser.add_argument("--gen-sizes", nargs="+", default=["150m", "1b"])
    parser.add_argument("--gen-batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--memory-size", default="1b")
    parser.add_argument("--memory-length", type=int, default=None,
                        help="prompt plus 16 new tokens (default: max_position_embeddings, 8192)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = parser.parse_args()

    transformers.utils.logging.disable_progress_bar()
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    device = jax.devices()[0]
    kind = str(device.device_kind)
    n = 8192 if device.platform == "gpu" else 1024
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    matmul = jax.jit(lambda a: a @ a)
    measured = 2 * n**3 / measure(lambda: matmul(a).block_until_ready(), 10)
    peak = peak_flops(device, "bfloat16") or measured
    print(f"{kind} ({device.platform}); jax {jax.__version__}, torch {torch.__version__} ({torch_device}), "
          f"transformers {transformers.__version__}; bf16 matmul {n}^3 measured {measured / 1e12:.1f} TFLOP/s, "
          f"MFU against {peak / 1e12:.1f}", flush=True)  # fmt: skip

    rows: list = []
    for part in args.parts:
        start = time.perf_counter()
        if part == "forward":
            part_forward(args, args.sizes, args.lengths, torch_device, peak, rows)
        elif part == "train":
            part_train(args, args.sizes, args.lengths, torch_device, peak, rows)
        elif part == "generate":
            part_generate(args, args.gen_sizes, torch_device, rows)
        else:
            part_memory(args, torch_device, rows)
        print(f"[{part}: {time.perf_counter() - start:.0f} s]", flush=True)

    command = shlex.join(["python", "benchmarks/gpu.py", *sys.argv[1:]])
    header = (
        f"\n### GPU, {datetime.date.today()}, {kind}\n\n"
        f"jax {jax.__version__}, torch {torch.__version__} ({torch_device}, sdpa), transformers "
        f"{transformers.__version__}; bf16; median of {args.repeats} after a warm-up. MFU against "
        f"{peak / 1e12:.1f} TFLOP/s (measured {n}^3 bf16 matmul: {measured / 1e12:.1f}). `{command}`\n\n"
        "| part | shape | batch | transformers | ettin-jax | ratio | ettin-jax MFU or tok/s | transformers MFU or tok/s | note |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    ms = lambda t: "—" if t != t else f"{t * 1e3:.1f} ms"  # noqa: E731  (nan: a side not run)
    ratio = lambda a, b: "—" if a != a or b != b else f"{a / b:.2f}x"  # noqa: E731
    pct = lambda x, t: "—" if t != t else f"{100 * x:.1f}%"  # noqa: E731
    lines = []
    for part, size, shape, theirs, ours, a_, b_, note in rows:
        if part == "generate":
            lines.append(f"| {part} | {size} | {shape} | {theirs:.3f} s | {ours:.3f} s | {theirs / ours:.2f}x "
                         f"| {a_:.0f} tok/s | {b_:.0f} tok/s | {note} |")  # fmt: skip
        elif part == "memory":
            lines.append(f"| {part} | {size} | {shape} | | {ours:.3f} s | | | | {note} |")
        else:
            lines.append(f"| {part} | {size} | {shape} | {ms(theirs)} | {ms(ours)} | {ratio(theirs, ours)} "
                         f"| {pct(a_, ours)} | {pct(b_, theirs)} | {note} |")  # fmt: skip
    report(header + "\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    sys.exit(main())
