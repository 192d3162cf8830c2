"""Greedy generation, ettin-jax against transformers, side by side in one process.

Same random weights, same prompts, CPU float32 (XLA on CPU does not use bf16 matrix units the
way PyTorch's oneDNN does, so float32 is the fair comparison). Every row generates exactly
`--new` tokens (no EOS), and each side runs once untimed first (compilation, allocator warm-up).

    python benchmarks/generate.py                       # 17m and 150m, batch 1 and 16
    python benchmarks/generate.py --sizes 17m --record  # and append the table to RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile

import numpy as np
from common import measure_alternating, report

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["17m", "150m"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    import ettin_jax as ej

    rows = []
    for size in args.sizes:
        config = ej.ModernBertDecoderConfig.ettin(size)
        torch.manual_seed(0)
        reference = transformers.ModernBertDecoderForCausalLM(
            transformers.ModernBertDecoderConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
        ).eval()
        with tempfile.TemporaryDirectory() as directory:
            reference.save_pretrained(directory)
            model = ej.ModernBertDecoderForCausalLM.from_pretrained(directory)
        for batch in args.batches:
            prompts = np.random.default_rng(0).integers(0, 50000, size=(batch, args.prompt))

            def ours(prompts=prompts, model=model):
                return model.generate(prompts, max_new_tokens=args.new, eos_token_id=[])

            def theirs(prompts=prompts, reference=reference):
                with torch.no_grad():
                    return reference.generate(
                        torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                        max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, eos_token_id=None,
                        pad_token_id=0,
                    )  # fmt: skip

            same = np.array_equal(ours(), theirs().numpy())
            times = measure_alternating({"ours": ours, "theirs": theirs}, args.repeats)
            t_ours, t_theirs = times["ours"], times["theirs"]
            tokens = batch * args.new
            rows.append((size, batch, tokens / t_theirs, tokens / t_ours, t_theirs / t_ours, same))
            print(f"{size:>5} batch {batch:>3}: transformers {tokens / t_theirs:8.1f} tok/s, "
                  f"ettin-jax {tokens / t_ours:8.1f} tok/s, ratio {t_theirs / t_ours:5.2f}x, "
                  f"same tokens: {same}", flush=True)  # fmt: skip

    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}"
    header = (
        f"\n### generate, {datetime.date.today()}, {machine}\n\n"
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, transformers "
        f"{transformers.__version__}; float32, greedy, prompt {args.prompt} tokens, {args.new} new tokens, "
        f"median of {args.repeats} after a warm-up, the two sides alternating run by run.\n\n"
        "| shape | batch | transformers tok/s | ettin-jax tok/s | ratio | same tokens |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
    )
    table = "".join(f"| {s} | {b} | {t:.1f} | {o:.1f} | {r:.2f}x | {same} |\n" for s, b, t, o, r, same in rows)
    report(header + table, args.record)


if __name__ == "__main__":
    sys.exit(main())
