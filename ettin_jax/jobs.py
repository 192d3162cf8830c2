"""Prompt-file jobs, as `ettin-jax generate --input-file F --output-file O` runs them: every
prompt through the continuous-batching engine, each result written as soon as it and every
result before it are done, in input order.

Surviving a kill (pods are preempted):
- a result is one JSON line, appended with one `write` (no buffer in between), so a kill leaves
  whole lines and at most one torn last line; results that complete early wait in memory until
  those before them are written;
- `resume=True` cuts off a torn last line, checks that the lines present are the results of the
  first prompts, in order, and serves only the rest. A request's tokens depend only on its
  prompt, its settings and its seed (see `ettin_jax.engine`; seeds from
  `ettin_jax.pipelines.sample_seed`), so the finished file is byte-identical to an
  uninterrupted run's;
- SIGTERM stops the job after the engine's current round, with the lines written so far synced.

Several processes without a mesh share the prompts: prompt i goes to process i % n, which
serves it on its own device and appends it to its part file beside the output
(`part_path`); once every process is done, process 0 merges the parts in input order. With a
mesh, every process runs every request on the one global mesh and process 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from ettin_jax import distributed, files
from ettin_jax.engine import Engine, Request
from ettin_jax.errors import EttinError
from ettin_jax.generation import resolve
from ettin_jax.padding import bucket
from ettin_jax.pipelines import TextGenerationPipeline, sample_seed

log = logging.getLogger("ettin_jax.jobs")


class JobError(EttinError, ValueError):
    """A prompt file, an output file or a job that cannot run, named in the message."""


# ---- prompts ------------------------------------------------------------------------------
def read_prompts(path: str) -> list[str]:
    """The prompts of a .txt file (one a line) or a .jsonl file (a string, or an object with
    "prompt" or "text", a line); blank lines are skipped. A malformed line is an error naming
    the file and the line."""
    prompts = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise JobError(f"{path}:{number}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark, as some editors write
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                prompts.append(line)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise JobError(f"{path}:{number}: not valid JSON ({e})") from None
            text = record.get("prompt", record.get("text")) if isinstance(record, dict) else record
            if not isinstance(text, str):
                raise JobError(f'{path}:{number}: expected a string or an object with "prompt" or "text"')
            prompts.append(text)
    if not prompts:
        raise JobError(f"{path} holds no prompts")
    return prompts


# ---- the output ---------------------------------------------------------------------------
def part_path(output: str, process: int, processes: int) -> str:
    """The file beside `output` that process `process` of `processes` writes its share to."""
    return f"{output}.part-{process:05d}-of-{processes:05d}"


def result_line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


class InOrder:
    """Hands items to `write` in the order of their positions, whatever order they come in:
    one that comes early waits until those before it have been written."""

    def __init__(self, write: Callable[[Any], None], start: int = 0):
        self.write, self.next = write, start
        self.waiting: dict[int, Any] = {}

    def put(self, position: int, item: Any) -> None:
        self.waiting[position] = item
        while self.next in self.waiting:
            self.write(self.waiting.pop(self.next))
            self.next += 1


class Appender:
    """Appends lines to a file, each with one unbuffered `write`; `close()` syncs it to disk."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def __call__(self, line: bytes) -> None:
        view = memoryview(line)
        while view:  # a regular file takes it all at once unless the disk is full
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


def results_present(path: str, prompts: Sequence[str], indices: Sequence[int], input_file: str) -> int:
    """How many results `path` holds, each line checked to be the result of the prompt
    `indices[line]` of `prompts` (read from `input_file`). A torn last line, the trace of a
    kill during its write, is cut off."""
    kept = count = 0
    with open(path, "r+b") as f:
        for line in f:
            if not line.endswith(b"\n"):
                # Cut off only what a kill can leave: the start of the next result's line. Bytes
                # that are not that are someone else's file, and stay.
                start = result_line({"prompt": prompts[indices[count]]})[:-2] if count < len(indices) else b""
                if not start or line[: len(start)] != start[: len(line)]:
                    raise JobError(
                        f"{path}:{count + 1} is neither a result nor the start of one of the prompts of {input_file}: "
                        "it is not this job's output; pass another --output-file"
                    )
                log.warning(
                    "%s: cut off a partial last line (%d bytes), written as the job was killed", path, len(line)
                )
                f.truncate(kept)
                break
            if count == len(indices):
                raise JobError(
                    f"{path} holds more results than its share of the {len(prompts)} prompts of {input_file}: it is "
                    "not this job's output; pass another --output-file"
                )
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or record.get("prompt") != prompts[indices[count]]:
                raise JobError(
                    f"{path}:{count + 1} is not the result of prompt {indices[count] + 1} of {input_file}: --resume "
                    "continues a job with the input file it started with; pass another --output-file"
                )
            count += 1
            kept += len(line)
    return count


def _start(path: str, prompts: Sequence[str], indices: Sequence[int], input_file: str, resume: bool) -> int:
    """Where the writer of `path` starts: 0 for a new file, the results present with `resume`."""
    if not os.path.exists(path):
        return 0
    if not resume:
        raise JobError(
            f"{path} already exists; pass --resume to continue the job that wrote it, or choose another --output-file"
        )
    return results_present(path, prompts, indices, input_file)


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file, however spelt: relative or absolute, through symlinks
    or `..`, or hard links of one file."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet)
        return False


def check_paths(input_file: str | None, output_file: str) -> None:
    """A `JobError` for an output that would lose something: the input file itself (however
    spelt), a directory, or a place that does not exist."""
    if input_file is not None and same_file(input_file, output_file):
        raise JobError(
            f"--output-file {output_file} is the input file; choose another name (writing it would destroy the "
            f"prompts of {input_file})"
        )
    if os.path.isdir(output_file):
        raise JobError(f"--output-file {output_file} is a directory; give the path of a .jsonl file")
    parent = os.path.dirname(os.path.abspath(output_file))
    if not os.path.isdir(parent):
        raise JobError(f"the directory of --output-file {output_file} does not exist: {parent}")


def _gather(error: EttinError | None, values: Sequence[int]) -> np.ndarray:
    """Every process's `values`, (processes, len(values)). A check that failed on any process
    stops them all: that process with its own error, the others naming it."""
    row = np.asarray([error is not None, *values], np.int32)
    if jax.process_count() == 1:
        rows = row[None]
    else:
        rows = np.asarray(multihost_utils.process_allgather(row)).reshape(jax.process_count(), -1)
    if error is not None:
        raise error
    failed = np.flatnonzero(rows[:, 0])
    if failed.size:
        raise JobError(f"process(es) {', '.join(map(str, failed))} could not start the job (see their errors)")
    return rows[:, 1:]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What this process serves and where it writes."""

    indices: list[int]  # the prompts it serves (its share), in order
    done: int  # how many of them already have their result in `path` (resumed)
    path: str | None  # the file it appends to (the output, or its part); None: it writes no file
    output: str | None  # the job's output file
    merge: bool  # once all processes are done, process 0 merges their part files into the output
    finished: bool  # the output already holds every result: nothing to do


def plan(
    prompts: Sequence[str],
    input_file: str | None,
    output_file: str | None,
    *,
    resume: bool = False,
    share: bool = False,
) -> Plan:
    """Checks the output before any work and agrees on where each process starts; an error on
    any process stops them all. `share`: each process serves every n-th prompt into a part file
    (several processes without a mesh); else process 0 writes `output_file` (a mesh, or one
    process). An existing output is refused unless `resume`."""
    processes, me = jax.process_count(), jax.process_index()
    share = share and output_file is not None and processes > 1
    indices = list(range(me, len(prompts), processes)) if share else list(range(len(prompts)))
    everyone = list(range(len(prompts)))
    source = input_file or "the prompts"
    error, done, finished = None, 0, False
    try:
        if output_file is not None:
            check_paths(input_file, output_file)
        if share:
            if me == 0 and os.path.exists(output_file):
                present = _start(output_file, prompts, everyone, source, resume)
                if present < len(prompts):
                    raise JobError(
                        f"{output_file} holds {present} of {len(prompts)} results: a single writer (one process, "
                        "or --mesh) started it; resume it the same way, or choose another --output-file"
                    )
                finished = True
            done = _start(part_path(output_file, me, processes), prompts, indices, source, resume)
        elif output_file is not None and me == 0:
            done = _start(output_file, prompts, indices, source, resume)
    except (EttinError, OSError) as e:
        error = e if isinstance(e, EttinError) else JobError(str(e))
    rows = _gather(error, [done, finished])
    if share:
        finished = bool(rows[0, 1])
        if finished and me == 0:  # merged before, but killed before the parts were deleted
            for part in (part_path(output_file, p, processes) for p in range(processes)):
                if os.path.exists(part):
                    os.remove(part)
        return Plan(indices, int(rows[me, 0]), part_path(output_file, me, processes), output_file, True, finished)
    done = int(rows[0, 0])
    path = output_file if me == 0 else None
    return Plan(indices, done, path, output_file, False, output_file is not None and done == len(prompts))


# ---- running ------------------------------------------------------------------------------
@dataclasses.dataclass
class Summary:
    """What this process did."""

    prompts: int  # results made in this run
    tokens: int  # new tokens made in this run
    failed: int  # results that are an error
    seconds: float
    preempted: bool  # stopped by SIGTERM: run again with --resume
    written: int  # results in the finished output (process 0), 0 if it wrote none


def _record(generator: TextGenerationPipeline, text: str, requests: Sequence[Request]) -> dict[str, Any]:
    """A prompt's result line: its text(s), or the error of the first of its requests that failed."""
    error = next((r.error for r in requests if r.error), None)
    if error is not None:
        return {"prompt": text, "error": error}
    texts = [generator.record(text, r.tokens, stop_strings=r.config.stop_strings)["generated_text"] for r in requests]
    return {"prompt": text, "generated_text": texts if len(texts) > 1 else texts[0]}


def run(
    generator: TextGenerationPipeline,
    prompts: Sequence[str],
    job: Plan,
    *,
    max_batch_size: int | None = None,
    progress: bool = False,
    echo: Callable[[dict[str, Any]], None] | None = None,
    **generate_kwargs: Any,
) -> Summary:
    """Serves the prompts of `job` on an engine and appends each result, in order, to
    `job.path`; merges the part files if `job.merge`. Without a path, `echo(result)` gets each
    result in order instead (the CLI prints them). `generate_kwargs` are `generate`'s;
    the j-th of n sequences of prompt i has the seed `sample_seed(seed, i, j, n)`."""
    start = time.perf_counter()
    config, copies = generator.sampling(**generate_kwargs)
    total = len(prompts)
    if job.finished:
        return Summary(0, 0, 0, 0.0, False, _written(job, total))
    if job.done == len(job.indices):  # this process's share is done; the others' may not be
        _merge_parts(job, total)
        return Summary(0, 0, 0, time.perf_counter() - start, False, _written(job, total))
    # Every process sizes its engine from all the prompts, so that the cache, and with it every
    # program, is the same whichever prompts this process (or this resumed run) serves.
    ids = [generator.encode(text) for text in prompts]
    longest = max(map(len, ids)) + resolve(generator.model.config, config, 1).max_new
    context = min(generator.model.config.max_position_embeddings, bucket(longest))
    engine = Engine(generator.model, max_batch_size=max_batch_size, max_length=context)
    together = engine.mesh is not None  # every process runs this engine's rounds in step
    # Enough requests in flight to refill every slot at once, few enough that results which
    # complete out of order stay few.
    window = 2 * engine.batch + engine.prefill_batch
    appender = Appender(job.path) if job.path is not None else None
    out = InOrder((lambda r: appender(result_line(r))) if appender else (echo or (lambda r: None)), job.done)
    live: dict[int, list[Request]] = {}  # by position in the share
    position = job.done  # the next of the share to submit
    made = tokens = failed = 0
    from tqdm.auto import tqdm  # slow to import; only a job shows a bar

    bar = tqdm(total=len(job.indices), initial=job.done, unit="prompt", disable=not progress, dynamic_ncols=True)
    try:
        with distributed.Preemption() as preemption:
            while position < len(job.indices) or live:
                while position < len(job.indices) and len(live) * copies < window:
                    index = job.indices[position]
                    live[position] = [
                        engine.submit(
                            ids[index],
                            config,
                            seed=sample_seed(config.seed, index, j, copies),
                            tokenizer=generator.tokenizer,
                        )
                        for j in range(copies)
                    ]
                    position += 1
                busy = engine.step()
                ended = [p for p, requests in live.items() if all(r.done for r in requests)]
                if not busy and not ended:
                    raise RuntimeError("the engine went idle with requests unfinished")
                for p in ended:
                    requests = live.pop(p)
                    record = _record(generator, prompts[job.indices[p]], requests)
                    made, failed = made + 1, failed + ("error" in record)
                    tokens += sum(len(r.tokens) for r in requests)
                    out.put(p, record)
                if ended:
                    rate = engine.stats["tokens"] / (time.perf_counter() - start)
                    bar.set_postfix_str(f"{rate:.0f} tokens/s, slots {engine.utilisation():.0%} busy", refresh=False)
                    bar.update(len(ended))
                if preemption.agreed(together):
                    return Summary(made, tokens, failed, time.perf_counter() - start, True, 0)
    finally:
        bar.close()
        if appender is not None:
            appender.close()
    if job.merge:
        _merge_parts(job, total)
    return Summary(made, tokens, failed, time.perf_counter() - start, False, _written(job, total))


def _written(job: Plan, total: int) -> int:
    return total if job.output is not None and distributed.is_primary() else 0


def _merge_parts(job: Plan, total: int) -> None:
    """Once every process has written its part, process 0 interleaves them into the output
    (written under a temporary name, synced and renamed into place) and deletes them."""
    distributed.barrier("ettin-jax generate: every part written")
    if not distributed.is_primary():
        return
    processes, output = jax.process_count(), job.output
    parts = [part_path(output, p, processes) for p in range(processes)]

    def write(tmp: str) -> None:
        with contextlib.ExitStack() as stack, open(tmp, "wb") as f:
            handles = [stack.enter_context(open(part, "rb")) for part in parts]
            for i in range(total):
                line = handles[i % processes].readline()
                if not line.endswith(b"\n"):
                    raise JobError(f"{parts[i % processes]} ends before the result of prompt {i + 1}")
                f.write(line)
            f.flush()
            os.fsync(f.fileno())

    files.write_atomically(output, write)
    for part in parts:
        os.remove(part)
    log.info("merged the parts of %d processes into %s", processes, output)
