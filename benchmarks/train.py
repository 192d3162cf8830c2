"""Training steps/s, ettin-jax against a plain PyTorch loop on transformers, side by side in one process.

Same random weights, same batch (random token ids, no padding), same optimizer (AdamW, lr 1e-4,
betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on matrices only, no clipping, constant
schedule), CPU float32. Each side runs `--warmup` untimed steps first (for JAX the first one
compiles `train_step`), then `--steps` timed steps on the same batch, the two sides alternating
step by step so that both see the same load on a shared machine; steps/s is one over the median
step time. The first step's loss of both sides is printed as a sanity check: it should
agree to float32 rounding, since both start from the same weights and batch. PyTorch keeps its
default thread count (every core).

    python benchmarks/train.py                              # 17m, lm and classify, batch 16 x 128
    python benchmarks/train.py --sizes 17m 150m --record    # and append the table to RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from common import cpu_model, report

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TASKS = {"lm": "causal_lm", "classify": "single_label_classification"}
LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 1e-8, 0.01


def busy_cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds used by the whole machine, by this process) so far; None off Linux. Their
    difference over a step is what other programs took from the cores meanwhile."""
    try:
        with open("/proc/stat") as f:
            jiffies = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    times = os.times()
    return (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK"), times.user + times.system


def timed(steps_by_side: dict[str, Callable[[], float]], warmup: int, steps: int) -> dict[str, dict[str, Any]]:
    """Runs each side's step `warmup` times untimed, then `steps` timed rounds that alternate the
    sides step by step, so that both see the same load on a shared machine. Each step returns its
    loss as a Python float, which waits for the step to finish. Per side: the first step's loss,
    the warm-up's seconds, the timed steps' seconds, the last step's loss and `others`, the cores
    that other programs kept busy during the timed steps (None where that cannot be read)."""
    out = {}
    for side, step in steps_by_side.items():
        start = time.perf_counter()
        first = step()
        for _ in range(warmup - 1):
            step()
        out[side] = {"first": first, "warmup_s": time.perf_counter() - start, "times": [], "others_s": 0.0}
    readable = busy_cpu_seconds() is not None
    for _ in range(steps):
        for side, step in steps_by_side.items():
            before = busy_cpu_seconds()
            start = time.perf_counter()
            out[side]["last"] = step()
            out[side]["times"].append(time.perf_counter() - start)
            after = busy_cpu_seconds()
            if before and after:
                out[side]["others_s"] += (after[0] - before[0]) - (after[1] - before[1])
    for side in out:
        out[side]["others"] = max(out[side]["others_s"], 0.0) / sum(out[side]["times"]) if readable else None
    return out


def spread(times: list[float]) -> str:
    return f"min {min(times):.2f} / median {statistics.median(times):.2f} / max {max(times):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["17m"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--tasks", default="lm,classify", help="comma-separated: lm, classify")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1: JAX compiles in the first)")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's own, every core)"
    )
    parser.add_argument(
        "--keep-host-memory",
        action="store_true",
        help="call ettin_jax.compilation.keep_host_memory first, as `ettin-jax train` does; it tunes glibc's "
        "malloc for the whole process, so PyTorch's side runs with it too",
    )
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = parser.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = set(tasks) - set(TASKS)
    if unknown:
        parser.error(f"unknown task(s) {sorted(unknown)}; expected {', '.join(TASKS)}")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")

    from ettin_jax import compilation  # imports JAX without starting its backend

    kept = compilation.keep_host_memory() if args.keep_host_memory else False
    if args.keep_host_memory and not kept:
        parser.error("keep_host_memory did not apply (not glibc, or JAX had already started)")

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    import ettin_jax as ej
    from ettin_jax.train.optim import OptimizerConfig, make_optimizer
    from ettin_jax.train.steps import create_train_state, train_step

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's "Writing model shards"

    machine = f"{platform.machine()}, {cpu_model()}, os.cpu_count() = {os.cpu_count()}"
    versions = (
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    threads = f"torch threads {torch.get_num_threads()} ({'set' if args.torch_threads else 'default'})"
    print(f"{machine}\n{versions}\n{threads}", flush=True)

    tx = make_optimizer(
        OptimizerConfig(
            learning_rate=LR, schedule="constant", weight_decay=WEIGHT_DECAY, b1=BETAS[0], b2=BETAS[1], eps=EPS,
            max_grad_norm=None,
        )
    )  # fmt: skip
    rows, attn = [], set()
    for size in args.sizes:
        for task in tasks:
            config = ej.ModernBertDecoderConfig.ettin(size)
            if task == "classify":
                config = config.replace(problem_type=TASKS[task], num_labels=2)
            # The preset's pad_token_id (50283) lies outside the sampled ids, so both sides pool the
            # last token of every row.
            hf_config = transformers.ModernBertDecoderConfig(
                **{k: v for k, v in config.to_dict().items() if k != "model_type"}
            )
            # A training loop has no use for the KV cache transformers would otherwise build in forward.
            hf_config.use_cache = False
            torch.manual_seed(0)
            hf_class = "ModernBertDecoderForCausalLM" if task == "lm" else "ModernBertDecoderForSequenceClassification"
            reference = getattr(transformers, hf_class)(hf_config)
            with tempfile.TemporaryDirectory() as directory:
                reference.save_pretrained(directory)
                model = getattr(ej, hf_class).from_pretrained(directory)
            attn.add(reference.config._attn_implementation)

            rng = np.random.default_rng(0)
            ids = rng.integers(0, 50000, size=(args.batch, args.length))
            labels = ids if task == "lm" else rng.integers(0, 2, size=(args.batch,))

            # ---- ettin-jax: the jitted train_step, batch stacked on a grad-accum axis of 1 ----
            holder = {"state": create_train_state(model, tx, seed=0)}  # train_step donates the old state
            del model
            batch = {
                "input_ids": jnp.asarray(ids[None], jnp.int32),
                "attention_mask": jnp.ones((1, *ids.shape), jnp.int32),
                "labels": jnp.asarray(labels[None], jnp.int32),
            }
            key = jax.random.PRNGKey(0)

            def ours(holder=holder, batch=batch, key=key):
                state = holder["state"]
                state, metrics = train_step(state, batch, jax.random.fold_in(key, state.step))
                holder["state"] = state
                # Block on every step (not once after the loop), as PyTorch's eager loop finishes
                # each step before the next starts; float() waits for the loss, block_until_ready
                # for the updated params and optimizer state.
                jax.block_until_ready((state, metrics))
                return float(metrics["loss"])

            # ---- transformers: a plain PyTorch loop ----------------------------------------
            reference.train()
            decay = [p for p in reference.parameters() if p.ndim >= 2]
            no_decay = [p for p in reference.parameters() if p.ndim < 2]
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                lr=LR, betas=BETAS, eps=EPS,
            )  # fmt: skip
            t_ids, t_mask = torch.tensor(ids), torch.ones(ids.shape, dtype=torch.long)
            t_labels = torch.tensor(labels)

            def theirs(reference=reference, opt=opt, t_ids=t_ids, t_mask=t_mask, t_labels=t_labels):
                loss = reference(input_ids=t_ids, attention_mask=t_mask, labels=t_labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.item()

            result = timed({"ours": ours, "theirs": theirs}, args.warmup, args.steps)
            first_ours, first_theirs = result["ours"]["first"], result["theirs"]["first"]
            times_ours, times_theirs = result["ours"]["times"], result["theirs"]["times"]
            del holder, reference, opt

            sps_ours, sps_theirs = 1 / statistics.median(times_ours), 1 / statistics.median(times_theirs)
            tokens = args.batch * args.length
            others = [result[side]["others"] for side in ("ours", "theirs")]
            load = "n/a" if None in others else f"{others[0]:.1f} / {others[1]:.1f} cores"
            row = (size, task, f"{args.batch} x {args.length}", sps_ours, sps_theirs, sps_ours / sps_theirs,
                   tokens * sps_ours, tokens * sps_theirs, abs(first_ours - first_theirs), load)  # fmt: skip
            rows.append(row)
            print(f"{size:>5} {task:>8}: first-step loss ettin-jax {first_ours:.6f}, transformers {first_theirs:.6f}, "
                  f"|diff| {abs(first_ours - first_theirs):.2e}; after {args.warmup + args.steps} steps "
                  f"{result['ours']['last']:.6f} vs {result['theirs']['last']:.6f}", flush=True)  # fmt: skip
            print(f"{size:>5} {task:>8}: ettin-jax {sps_ours:6.2f} steps/s ({tokens * sps_ours:8.0f} tok/s), "
                  f"transformers {sps_theirs:6.2f} steps/s ({tokens * sps_theirs:8.0f} tok/s), "
                  f"ratio {sps_ours / sps_theirs:5.2f}x; JAX warm-up (compile) {result['ours']['warmup_s']:.1f} s; "
                  f"step seconds ettin-jax {spread(times_ours)}, transformers {spread(times_theirs)}; "
                  f"other programs' load during ettin-jax / transformers steps: {load}", flush=True)  # fmt: skip

    command = shlex.join(["python", "benchmarks/train.py", *sys.argv[1:]])
    header = (
        f"\n### train, {datetime.date.today()}, {machine}\n\n"
        f"{versions}; float32, AdamW (lr {LR}, weight decay {WEIGHT_DECAY} on matrices, no clipping), "
        f"same weights and batch on both sides (no padding), transformers attention "
        f"{'/'.join(sorted(attn))}, glibc malloc "
        f"{'kept freed memory (keep_host_memory, both sides)' if kept else 'at its defaults'}, "
        f"{threads}; steps/s is one over the "
        f"median of {args.steps} timed steps after {args.warmup} untimed (JAX compiles in the first), "
        f"the sides alternating step by step, JAX blocked on every step; `other load` is the cores other programs "
        f"kept busy during the timed steps (from /proc/stat). `{command}`\n\n"
        "| shape | task | batch x length | ettin-jax steps/s | transformers steps/s | ratio "
        "| ettin-jax tok/s | transformers tok/s | first-step loss diff | other load |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    table = "".join(
        f"| {s} | {t} | {bl} | {o:.2f} | {th:.2f} | {r:.2f}x | {to:.0f} | {tt:.0f} | {d:.1e} | {load} |\n"
        for s, t, bl, o, th, r, to, tt, d, load in rows
    )
    report(header + table, args.record)


if __name__ == "__main__":
    sys.exit(main())
