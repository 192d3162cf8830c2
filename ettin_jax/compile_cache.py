"""JAX's persistent compilation cache: compiled programs are written to disk, so that the next
process running the same programs loads them instead of compiling them again (cold start).

The `ettin-jax` command turns it on for the length of each command. Importing the library does
not: that would change JAX's global configuration for the whole program that imports it. A
library user opts in with `enable_compilation_cache()`.

Where the cache lives, first match wins: the `directory` given (the command's
`--compilation-cache`), the `ETTIN_JAX_COMPILATION_CACHE` environment variable, a directory the
user already gave JAX (`JAX_COMPILATION_CACHE_DIR`), and `jax-cache` under the package's home
(`$ETTIN_JAX_HOME`, default `~/.cache/ettin-jax`). `off`, as the directory or in the variable,
turns the cache off. Entries are keyed on the program, the compiler options, the devices and
the jax version, so one directory serves every model and platform.

JAX writes only programs that took at least a second to compile by default; this model's
prefill, chunk and single-step programs take less on a CPU, and together they are most of a
cold start's compile time. So every program of at least `MIN_COMPILE_TIME_S` is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from ettin_jax.files import home

ENV = "ETTIN_JAX_COMPILATION_CACHE"
OFF = "off"
MIN_COMPILE_TIME_S = 0.0  # JAX's default is 1 s
_SETTINGS = (
    "jax_enable_compilation_cache",
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)
logger = logging.getLogger(__name__)


def cache_dir(directory: str | None = None) -> str | None:
    """The cache directory that `directory`, the environment and JAX's own setting choose;
    None when the cache is off."""
    for choice in (directory, os.environ.get(ENV)):
        if choice:
            return None if choice.strip().lower() == OFF else os.path.abspath(os.path.expanduser(choice))
    return jax.config.jax_compilation_cache_dir or os.path.join(home(), "jax-cache")


def enable_compilation_cache(
    directory: str | None = None, *, min_compile_time_s: float = MIN_COMPILE_TIME_S
) -> str | None:
    """Turns JAX's persistent compilation cache on in `directory` (default: see the module
    docstring), or off with "off"; returns the directory in use, or None when off. Call it
    before compiling: programs compiled earlier in the process are not written. A directory
    that cannot be created leaves the cache off, with a warning, rather than failing."""
    path = cache_dir(directory)
    if path is not None:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            logger.warning("compilation cache off: cannot create %s (%s)", path, e)
            path = None
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # every size, no override
    jax_cache.reset_cache()  # JAX opens its cache once per process: reopen it where we said
    return path


@contextlib.contextmanager
def compilation_cache(directory: str | None = None) -> Iterator[str | None]:
    """`enable_compilation_cache(directory)` for the body of a `with`; JAX's earlier settings
    come back afterwards (a command may run inside another program, or a test)."""
    saved = {name: getattr(jax.config, name) for name in _SETTINGS}
    try:
        yield enable_compilation_cache(directory)
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        jax_cache.reset_cache()
