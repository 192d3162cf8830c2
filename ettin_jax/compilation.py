"""`jit` with XLA:CPU options that make this model's programs faster on CPU.

XLA:CPU hands matmuls, and the elementwise and reduction fusions around them, to YNNPACK by
default. For this model that is slower than XLA's own loops and Eigen's matmuls. In A/B runs
in one process on the same lowered HLO (2-core x86 CPU, 2026-11-22), turning the YNNPACK
fusions off made greedy decoding at batch 16 1.2x to 1.5x faster (17m and 150m shapes) and the
150m forward at 4x512 about 1.1x faster; the decode step's (16, 256) x (256, 50368) vocabulary
projection alone went from 7.6 to 4.9 ms. Train steps ran as fast as with YNNPACK kept for
matmuls alone (the library's earlier setting, chosen because under the default the bias
gradient of the vocabulary projection ran about 10x slower). benchmarks/RESULTS.md has the
resulting ratios against transformers, before and after.

The backend is checked at the first call, not at import, so that importing the library does
not start a JAX backend (`jax.distributed.initialize` must come first). On GPU and TPU, and with
an XLA that does not know the option, the function is jitted without it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

CPU_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}


class TunedJit:
    """Like `jax.jit(fn, **jit_kwargs)`, compiled with `options` (default `CPU_OPTIONS`) when
    the backend is CPU.
    Other public attributes (`lower`, `trace`, ...) are the plain jitted function's, so
    ahead-of-time compilation for another platform sees no CPU options; `_cache_size` and
    `clear_cache` cover both."""

    def __init__(self, fn: Any, options: dict[str, Any] | None = None, **jit_kwargs: Any):
        functools.update_wrapper(self, fn)
        self.options = CPU_OPTIONS if options is None else options
        self._plain = jax.jit(fn, **jit_kwargs)
        self._tuned = jax.jit(fn, compiler_options=self.options, **jit_kwargs)
        self._chosen: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._chosen is None:
            self._chosen = self._tuned if jax.default_backend() == "cpu" else self._plain
        try:
            return self._chosen(*args, **kwargs)
        except jax.errors.JaxRuntimeError as e:
            if self._chosen is self._plain or not any(option in str(e) for option in self.options):
                raise
            self._chosen = self._plain  # an XLA without this option: compile without it
            return self._plain(*args, **kwargs)

    def _cache_size(self) -> int:
        return self._plain._cache_size() + self._tuned._cache_size()

    def clear_cache(self) -> None:
        self._plain.clear_cache()
        self._tuned.clear_cache()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # private and special names are this object's own (copy, pickle)
            raise AttributeError(name)
        return getattr(self._plain, name)


def jit(fn: Any = None, **jit_kwargs: Any) -> Any:
    """`jax.jit`, tuned for XLA:CPU; usable as `@jit` or `@functools.partial(jit, ...)`."""
    if fn is None:
        return functools.partial(jit, **jit_kwargs)
    return TunedJit(fn, **jit_kwargs)
