"""Packed against padded training: real (non-padding) tokens per second of the train step, on a
realistic mix of lengths, for `train lm` and `train classify`.

The documents are random token ids whose lengths follow a log-normal law, the long tail of web
text and of classification sets (most texts short, a few long):
- lm: median 120 tokens, sigma 1.0, from 8 to 2048; padded means one document per row,
  truncated to the block and padded to its bucket, as a trainer without packing reads them;
  packed means `train lm`'s blocks (documents concatenated and cut, kept apart by segment ids).
- classify: median 40 tokens, sigma 0.8, from 4 to --length; padded is `train classify`, packed
  `train classify --pack`.
Each side trains a random model of the Ettin shape for `--steps` timed steps after one untimed
(compiling) step per bucket shape it meets, on the same documents, the two sides alternating step
by step so that both see the same load; the report gives the fraction
of real tokens in the rows, the step time, and the real tokens per second with their ratio.

    python benchmarks/packing.py                        # 17m, CPU float32
    python benchmarks/packing.py --size 150m --dtype bfloat16 --record
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np
from common import cpu_model, report

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def lengths(kind: str, n: int, cap: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    median, sigma, low = (120, 1.0, 8) if kind == "lm" else (40, 0.8, 4)
    return np.clip(rng.lognormal(np.log(median), sigma, n).astype(int), low, cap)


def sides(kind: str, args) -> dict:
    """Per side, the batches to train on: (padded, packed)."""
    from ettin_jax.train.data import Batches, Examples, PackedBatches, pack_blocks

    rng = np.random.default_rng(1)
    bos, eos, pad = 1, 2, 0
    if kind == "classify":
        docs = [np.concatenate([[bos], rng.integers(3, 1000, n - 1)]).astype(np.int32)
                for n in lengths(kind, 4000, args.length)]  # fmt: skip
        examples = Examples(ids=docs, labels=rng.integers(0, 2, len(docs)).astype(np.int32))
        return {
            "padded": Batches(examples, args.batch, pad, args.length),
            "packed": PackedBatches(examples, args.batch, pad, args.length),
        }
    docs = [rng.integers(3, 1000, n - 2).astype(np.int32) for n in lengths(kind, 4000, 2048)]  # + BOS and EOS

    def tokenizer(texts, add_special_tokens=False):  # text i is document i
        return {"input_ids": [docs[int(t)] for t in texts]}

    padded = Examples(ids=[np.array([bos, *d, eos][: args.length], np.int32) for d in docs], labels=None)
    blocks, segments = pack_blocks(tokenizer, [str(i) for i in range(len(docs))], args.length, bos, eos)
    packed = Examples(ids=list(blocks), labels=None, segments=list(segments))
    return {
        "padded": Batches(padded, args.batch, pad, args.length),
        "packed": Batches(packed, args.batch, pad, args.length),
    }


def run(kind: str, args) -> list[tuple]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import ettin_jax as ej
    from ettin_jax.train.optim import OptimizerConfig, make_optimizer
    from ettin_jax.train.steps import create_train_state, train_step

    overrides = dict(vocab_size=1024, max_position_embeddings=max(args.length, 512))
    dtype = jnp.dtype(args.dtype)
    states, queued = {}, {}
    for side, batches in sides(kind, args).items():
        if kind == "classify":
            config = ej.ModernBertDecoderConfig.ettin(
                args.size, **overrides, num_labels=2, problem_type="single_label_classification", pad_token_id=0
            )
            model = ej.ModernBertDecoderForSequenceClassification(config, dtype=dtype, rngs=nnx.Rngs(0))
        else:
            config = ej.ModernBertDecoderConfig.ettin(args.size, **overrides)
            model = ej.ModernBertDecoderForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0))
        states[side] = create_train_state(model, make_optimizer(OptimizerConfig(learning_rate=1e-4)), seed=0)
        queued[side] = [batch for batch, _ in itertools.islice(batches.epoch(0), args.steps)]
        seen = set()
        for batch in queued[side]:  # compile each bucket shape untimed
            shape = tuple((name, x.shape) for name, x in batch.items())
            if shape not in seen:
                seen.add(shape)
                states[side], m = train_step(states[side], batch, jax.random.PRNGKey(0))
                float(m["loss"])
    times: dict[str, list[float]] = {side: [] for side in states}
    for step in range(args.steps):  # the sides alternate step by step: both see the same load
        for side in states:
            start = time.perf_counter()
            states[side], m = train_step(states[side], queued[side][step], jax.random.PRNGKey(0))
            float(m["loss"])
            times[side].append(time.perf_counter() - start)
    rows = []
    for side, batches in queued.items():
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        total = sum(b["attention_mask"].size for b in batches)
        rows.append((kind, side, real / total, statistics.median(times[side]), real / sum(times[side])))
        print(f"{kind} {side}: fill {real / total:.3f}, {real / sum(times[side]):,.0f} real tokens/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="17m")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--length", type=int, default=256, help="block size (lm) and --max-length (classify)")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per side")
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = parser.parse_args()
    import jax

    rows = run("lm", args) + run("classify", args)
    device = jax.devices()[0]
    machine = cpu_model() if device.platform == "cpu" else device.device_kind
    lines = [
        f"\n### Packed against padded training, {args.size} {args.dtype}, {machine} "
        f"({datetime.date.today().isoformat()})\n",
        f"`{shlex.join(['python', 'benchmarks/packing.py', *sys.argv[1:]])}` ({platform.python_version()}, jax "
        f"{jax.__version__}): {args.batch} rows of at most {args.length} tokens per step, {args.steps} timed steps "
        "per side; log-normal lengths (lm: median 120 tokens, classify: median 40). Real tokens are the rows' "
        "non-padding tokens. The two sides alternate step by step.\n",
        "| task | rows | real-token fraction | step (s) | real tokens/s | packed / padded |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind in ("lm", "classify"):
        padded, packed = (r for r in rows if r[0] == kind)
        for r in (padded, packed):
            ratio = f"{packed[4] / padded[4]:.2f}x" if r is packed else ""
            lines.append(f"| {kind} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:,.0f} | {ratio} |")
    report("\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    main()
