"""The persistent compilation cache: where it goes (flag, environment variable, the package's
home), `off`, the command line's flag, and a second process that loads what the first compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from ettin_jax import compile_cache
from ettin_jax.cli import build_parser, main

SETTINGS = (
    "jax_enable_compilation_cache",
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A fresh ETTIN_JAX_HOME, no cache variable, and JAX's cache settings restored afterwards."""
    monkeypatch.setenv("ETTIN_JAX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    saved = {name: getattr(jax.config, name) for name in SETTINGS}
    jax.config.update("jax_compilation_cache_dir", None)
    yield monkeypatch
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.mark.parametrize(
    ("flag", "variable", "expected"),
    [
        (None, None, "{home}/jax-cache"),
        (None, "{tmp}/from-env", "{tmp}/from-env"),
        (None, "off", None),
        (None, "OFF", None),
        ("{tmp}/from-flag", "{tmp}/from-env", "{tmp}/from-flag"),
        ("off", "{tmp}/from-env", None),
        ("{tmp}/from-flag", "off", "{tmp}/from-flag"),
    ],
)
def test_where_the_cache_goes(env, tmp_path, flag, variable, expected):
    def fill(s):
        return None if s is None else s.format(tmp=tmp_path, home=tmp_path / "home")

    if variable is not None:
        env.setenv(compile_cache.ENV, fill(variable))
    assert compile_cache.cache_dir(fill(flag)) == fill(expected)


def test_jax_own_setting_is_kept_when_we_are_not_told(env, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax-own"))
    assert compile_cache.cache_dir() == str(tmp_path / "jax-own")


def test_enabled_for_a_block_then_restored(env, tmp_path):
    with compile_cache.compilation_cache(str(tmp_path / "c")) as path:
        assert path == str(tmp_path / "c") and os.path.isdir(path)
        assert jax.config.jax_compilation_cache_dir == path and jax.config.jax_enable_compilation_cache
        assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_TIME_S
    assert jax.config.jax_compilation_cache_dir is None
    with compile_cache.compilation_cache("off") as path:
        assert path is None and not jax.config.jax_enable_compilation_cache
    assert jax.config.jax_enable_compilation_cache


def test_a_directory_that_cannot_be_made_turns_it_off(env, tmp_path):
    (tmp_path / "file").write_text("")
    with compile_cache.compilation_cache(str(tmp_path / "file" / "c")) as path:
        assert path is None and not jax.config.jax_enable_compilation_cache


@pytest.mark.parametrize(
    "argv",
    [
        ["--compilation-cache", "off", "generate", "hi"],
        ["generate", "hi", "--compilation-cache", "off"],
        ["convert", "a", "b", "--compilation-cache", "off"],
        ["train", "lm", "--train-file", "x.csv", "--output-dir", "o", "--epochs", "1", "--compilation-cache", "off"],
    ],
)
def test_the_flag_before_or_after_the_command(argv):
    assert build_parser().parse_args(argv).compilation_cache == "off"


def test_no_flag_leaves_the_choice_to_the_environment():
    assert build_parser().parse_args(["generate", "hi"]).compilation_cache is None


def test_the_command_uses_the_flag(env, tmp_path, capsys):
    target = tmp_path / "flag-cache"
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--compilation-cache", str(target)]) == 2
    assert target.is_dir()  # made when the command started
    assert jax.config.jax_compilation_cache_dir is None  # and JAX's settings restored after it
    assert not (tmp_path / "home" / "jax-cache").exists()


PROGRAM = """
import json, os, jax, jax.numpy as jnp
from ettin_jax import compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **_: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None
)
path = compile_cache.enable_compilation_cache()
jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((16, 16))).block_until_ready()
print(json.dumps({"path": path, "hits": len(hits)}))
"""


def run_program(home, variable: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR")}
    env["ETTIN_JAX_HOME"] = str(home)
    if variable is not None:
        env[compile_cache.ENV] = variable
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    first = run_program(tmp_path / "home")
    assert first == {"path": str(tmp_path / "home" / "jax-cache"), "hits": 0}
    assert os.listdir(first["path"])  # the program was written
    assert run_program(tmp_path / "home")["hits"] >= 1


def test_off_writes_nothing(tmp_path):
    assert run_program(tmp_path / "home", "off") == {"path": None, "hits": 0}
    assert not (tmp_path / "home" / "jax-cache").exists()
