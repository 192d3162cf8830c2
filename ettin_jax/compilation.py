"""`jit` with XLA:CPU options that make this model's programs faster on CPU.

XLA:CPU hands matmuls, and the elementwise and reduction fusions around them, to YNNPACK by
default. For this model that is slower than XLA's own loops and Eigen's matmuls: in one
process, on the same compiled HLO (benchmarks/RESULTS.md, 2-core x86 CPU), turning the YNNPACK
fusions off made greedy decoding of the 17m shape at batch 16 1.2x to 1.5x faster and the
150m shape at batch 16 1.2x faster; the decode step's (16, 256) x (256, 50368) vocabulary
projection alone went from 7.6 to 4.9 ms. Training steps were no slower (the bias gradient of
the vocabulary projection, a reduction over a (tokens, V) array, ran about 10x slower in
YNNPACK).

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
    Attributes other than calling (`lower`, `trace`, ...) are the plain jitted function's, so
    ahead-of-time compilation for another platform sees no CPU options."""

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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._plain, name)


def jit(fn: Any = None, **jit_kwargs: Any) -> Any:
    """`jax.jit`, tuned for XLA:CPU; usable as `@jit` or `@functools.partial(jit, ...)`."""
    if fn is None:
        return functools.partial(jit, **jit_kwargs)
    return TunedJit(fn, **jit_kwargs)
