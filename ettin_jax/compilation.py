"""XLA:CPU tuning, the only CPU-specific code of the library: `jit` with options that make this
model's programs faster on CPU, `gradient_fence`, which keeps XLA:CPU from recomputing the
residual stream's gradient, and `keep_host_memory`, which stops glibc from handing XLA:CPU fresh
pages at every step. Each stays because `benchmarks/tuning.py` shows it earns at least 10% on the
program it targets (benchmarks/RESULTS.md, 2026-11-30). None reaches a GPU or TPU program: the
choice follows `platforms.compile_platform`, the mesh's platform.

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

import ctypes
import ctypes.util
import functools
import platform
from typing import Any

import jax

from ettin_jax.platforms import backend_started, on_cpu

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
            self._chosen = self._tuned if on_cpu() else self._plain
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


# ---- gradient_fence ---------------------------------------------------------------------------
@jax.custom_vjp
def _fence(x: jax.Array) -> jax.Array:
    return x


def _fence_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return x, None


def _fence_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
    # Both branches return g (JAX would merge two identical branches, hence `* 1`); the
    # predicate (false only for a NaN) is data, so XLA can neither fold the conditional away nor
    # fuse elementwise work across it. (An optimization_barrier would not do: XLA:CPU expands
    # barriers before fusion.)
    probe = g.reshape(-1)[0]
    return (jax.lax.cond(probe == probe, lambda t: t, lambda t: t * 1, g),)


_fence.defvjp(_fence_fwd, _fence_bwd)


def gradient_fence(x: jax.Array) -> jax.Array:
    """`x` unchanged, forward and backward; on CPU its gradient is computed in full before
    anything that uses it.

    Why: in the backward pass the gradient of the residual stream is a chain of sums through
    every layer's LayerNorm backward, all elementwise. XLA:CPU fuses that chain into each of its
    consumers, notably the transposed copy that feeds a weight-gradient matmul, so the copy at
    layer k recomputes the chain of every layer above it: quadratic in depth. For the 17m shape
    at 16x128 such copies took 0.69 s of a 2.1 s gradient. A fence on each layer's input and
    after its attention residual (`DecoderLayer`) made the classifier train step 1.3x faster and
    the causal-LM step 1.1x (in-process A/B, same params to the bit after 6 steps; against
    PyTorch, benchmarks/train.py went from 0.64x to 0.80x and from 1.03x to 1.19x). Off CPU it
    is the identity: GPU and TPU fuse differently, and a conditional can cost a device-to-host
    sync on GPU."""
    return _fence(x) if on_cpu() else x


# ---- keep_host_memory -------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)
_KEPT: dict[str, bool] = {}


def keep_host_memory() -> bool:
    """Makes glibc's malloc keep the memory the process frees, instead of returning it to the
    kernel; returns whether it did. Call it before JAX runs anything (the `ettin-jax train`
    command does): once the backend has started, its threads have their own malloc arenas, and
    this returns False without changing anything. Off glibc (macOS, musl) it returns False too.

    Why: XLA:CPU allocates a train step's temporaries afresh at every step, and glibc serves
    blocks that large with mmap and unmaps them when freed, so the kernel maps and zeroes every
    page again at the next step. For the 17m causal LM at 16 x 128 tokens that was 307,000 page
    faults and 0.72 s of kernel time per 2.2 s step; with this, no faults and a 1.8 s step
    (2-core x86 CPU, 2026-11-22; benchmarks/RESULTS.md). What it sets: one malloc arena, no mmap
    for large blocks, no trimming of the heap's top. The cost: the process keeps its peak host
    memory mapped until it exits, and every thread allocates from one arena. It changes the whole
    process, PyTorch included, which is why the library never calls it on import."""
    if "kept" in _KEPT:
        return _KEPT["kept"]
    if platform.system() != "Linux" or backend_started():
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None or platform.libc_ver()[0] != "glibc":
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # A trim threshold of -1 turns trimming off (mallopt(3)).
    ok = all(
        mallopt(param, value) == 1 for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    )
    _KEPT["kept"] = ok
    return ok
