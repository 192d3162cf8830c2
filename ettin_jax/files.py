"""Writing files so that nothing a user made is lost: every file is written under a temporary
name beside its destination and renamed into place, and a directory is built in a staging
directory and published by one rename. A crash leaves either the old output or the new one,
never half of either. Conversion, the CLI and the trainer all write through here. And
`read_text` reads a UTF-8 text file, naming the line of any byte that is not UTF-8."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from ettin_jax.errors import EttinError


class NotTextError(EttinError, ValueError):
    """A file that is not UTF-8 text; the message names the file and the line."""


def home() -> str:
    """Where ettin-jax keeps what it makes for itself (compiled programs):
    `$ETTIN_JAX_HOME`, default `~/.cache/ettin-jax`."""
    return os.environ.get("ETTIN_JAX_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "ettin-jax")


def read_text(path: str | os.PathLike) -> str:
    """A file's UTF-8 text; bytes that are not UTF-8 are a `NotTextError` naming the file and
    the line they are on."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise NotTextError(f"{os.fspath(path)}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_staging_dir(parent: str, prefix: str) -> str:
    """A temporary directory in `parent` (beside its destination, so that a rename publishes
    it), with the permissions a plain mkdir would give rather than mkdtemp's 0700."""
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(path, 0o777 & ~_umask())
    return path


def staging_dir_for(destination: str) -> str:
    """A staging directory for `destination`, in its parent directory."""
    destination = os.path.abspath(destination)
    return make_staging_dir(os.path.dirname(destination), f".{os.path.basename(destination)}.tmp-")


def publish(staging: str, destination: str) -> None:
    """Moves the finished directory `staging` to `destination`, replacing what was there. The old
    directory is moved aside first and deleted only once the new one is in place."""
    destination = os.path.abspath(destination)
    if not os.path.exists(destination):
        os.replace(staging, destination)
        return
    parent, name = os.path.dirname(destination), os.path.basename(destination)
    old = make_staging_dir(parent, f".{name}.old-")
    os.replace(destination, os.path.join(old, name))
    os.replace(staging, destination)
    shutil.rmtree(old, ignore_errors=True)


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """write(tmp), then rename tmp to `path`: a crash never leaves a half-written file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented JSON with sorted keys and a final newline, written atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    write_atomically(path, write)


def write_jsonl(path: str | os.PathLike, records: Any) -> None:
    """One JSON object per line, written atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    write_atomically(path, write)
