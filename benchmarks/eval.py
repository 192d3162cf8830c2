"""Log-likelihood throughput for lm-evaluation-harness (issue 21): our `EttinLM` against the
harness's own `hf` backend, on the same random weights, requests and CPU, in one run.

The workload is shaped like HellaSwag, the slowest of the paper's multiple-choice tasks:
`--docs` documents, each a context of log-uniform length in [`--min-context`,
`--max-context`] tokens with `--choices` continuations of [`--min-choice`, `--max-choice`]
tokens. Both sides get the same tokenized requests through `_loglikelihood_tokens`, the method
every log-likelihood request of the harness ends in (tokenization, identical on both sides, is
left out). Each side runs the workload once untimed (compilation for JAX, warm-up for
PyTorch), then `--repeats` timed runs alternating between the sides; the median counts. The
two sides' log-likelihoods are compared (float32: they should agree within 1e-3).

    python benchmarks/eval.py                      # the 17m shape, hf at batch sizes 8 and 32
    python benchmarks/eval.py --size 150m --docs 50
    python benchmarks/eval.py --record             # and append the table to RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile

import numpy as np
from common import cpu_model, eos_biased_checkpoint, measure_alternating, report

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def workload(args) -> list[tuple[tuple[str, str], list[int], list[int]]]:
    """The harness's tokenized requests: ((context, continuation) strings, context ids, continuation ids)."""
    rng = np.random.default_rng(args.seed)

    def length(low: int, high: int) -> int:
        return int(np.clip(np.exp(rng.uniform(np.log(low), np.log(high + 1))), low, high))

    requests = []
    for doc in range(args.docs):
        context = [50281, *rng.integers(0, 50000, length(args.min_context, args.max_context) - 1).tolist()]
        for choice in range(args.choices):
            continuation = rng.integers(0, 50000, length(args.min_choice, args.max_choice)).tolist()
            requests.append(((f"doc {doc}", f"choice {choice}"), context, continuation))
    return requests


def checkpoint(size: str, directory: str) -> None:
    """A transformers causal LM of the Ettin `size` shape, random weights (seed 0), and a tokenizer."""
    from ettin_jax import default_model

    eos_biased_checkpoint(size, 0.0, directory)  # no bias: scoring never samples
    default_model.byte_tokenizer().save_pretrained(directory)  # only its special ids matter here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="17m")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--min-context", type=int, default=40)
    parser.add_argument("--max-context", type=int, default=160)
    parser.add_argument("--min-choice", type=int, default=10)
    parser.add_argument("--max-choice", type=int, default=40)
    parser.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--batch-size", type=int, help="ours: requests per batch (default: the token budget)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from ettin_jax.harness import EttinLM

    requests = workload(args)
    tokens = sum(len(c) + len(k) for _, c, k in requests)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint(args.size, directory)
        sides = {"ettin-jax": EttinLM(directory, batch_size=args.batch_size)}
        for b in args.hf_batch_sizes:
            sides[f"hf (batch {b})"] = HFLM(pretrained=directory, dtype="float32", batch_size=b, device="cpu")
        results = {name: lm._loglikelihood_tokens(requests, disable_tqdm=True) for name, lm in sides.items()}
        seconds = measure_alternating(
            {name: (lambda lm=lm: lm._loglikelihood_tokens(requests, disable_tqdm=True)) for name, lm in sides.items()},
            args.repeats,
        )
    ours = np.array([ll for ll, _ in results["ettin-jax"]])
    differences = {name: float(np.abs(np.array([ll for ll, _ in r]) - ours).max()) for name, r in results.items()}
    best_hf = min((s for name, s in seconds.items() if name != "ettin-jax"), default=None)
    rows = "\n".join(
        f"| {name} | {len(requests) / s:.1f} | {tokens / s:.0f} | {best_hf / s if best_hf else float('nan'):.2f}x | "
        f"{differences[name]:.1e} |"
        for name, s in seconds.items()
    )
    section = f"""
## Log-likelihood throughput for lm-eval (`benchmarks/eval.py`), {datetime.date.today()}
Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()}; torch {torch.__version__}, float32.
Ettin {args.size} shape, random weights; {args.docs} documents x {args.choices} choices = {len(requests)} requests,
contexts {args.min_context}-{args.max_context} tokens, continuations {args.min_choice}-{args.max_choice} (log-uniform);
{tokens} tokens. Median of {args.repeats} alternating runs, after one untimed run each.

| side | requests/s | tokens/s | vs best hf | max abs log-likelihood difference from ettin-jax |
|---|---|---|---|---|
{rows}
"""
    report(section, args.record)


if __name__ == "__main__":
    main()
