"""What the benchmark scripts share: timing, the CPU's name, and recording to RESULTS.md.
The scripts run as `python benchmarks/<name>.py`, which puts this folder on the import path."""

from __future__ import annotations

import os
import platform
import statistics
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def measure(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls, after one untimed call (compilation for JAX, allocator
    and kernels for PyTorch)."""
    return measure_alternating({"fn": fn}, repeats, settle=0.0)["fn"]


def measure_alternating(fns: dict, repeats: int, settle: float = 1.0) -> dict:
    """Median seconds of each of `fns` (name -> callable), after one untimed call of each, with
    the timed calls alternating between them: on a shared machine whose speed drifts, a slow
    spell then hits every side alike instead of whichever ran during it. Each timed call waits
    `settle` seconds first, so that the other library's worker threads, which spin for a while
    after their work, have gone to sleep."""
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(settle)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def report(section: str, record: bool) -> None:
    """Prints a results section and, with `record`, appends it to RESULTS.md."""
    print(section)
    if record:
        with open(RESULTS, "a") as f:
            f.write(section)


def eos_biased_checkpoint(size: str, bias: float, directory: str):
    """A transformers causal LM of the Ettin `size` shape with random weights (seed 0) and `bias`
    added to the EOS logit (so that EOS comes at data-dependent steps), saved to `directory`.
    Returns the model and the EOS id."""
    import torch
    import transformers

    import ettin_jax as ej

    config = ej.ModernBertDecoderConfig.ettin(size)
    torch.manual_seed(0)
    reference = transformers.ModernBertDecoderForCausalLM(
        transformers.ModernBertDecoderConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
    ).eval()
    eos = config.eos_token_ids[0]
    with torch.no_grad():
        reference.decoder.bias[eos] += bias
    reference.save_pretrained(directory)
    return reference, eos
