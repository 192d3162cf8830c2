"""What a run reports beyond metrics.jsonl: TensorBoard event files (`--report-to tensorboard`)
and each step's throughput (tokens per second, and MFU where the device's peak is known)."""

from __future__ import annotations

import math
import numbers
import os
import time
from collections.abc import Mapping
from typing import Any

from ettin_jax.train.args import TrainingError

EVAL_PREFIX = "eval_"


def tensorboardx() -> tuple[Any, Any, Any]:
    """tensorboardX's event-file writer and its Event and Summary protobuf modules; a
    TrainingError that says how to install it when it is missing (every process of a run asks
    before it starts, so that none waits for one that failed)."""
    try:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2, summary_pb2
    except ImportError:
        raise TrainingError(
            "TensorBoard logging needs tensorboardX, which is not installed: pip install 'ettin-jax[train]'"
        ) from None
    return EventsWriter, event_pb2, summary_pb2


class TensorBoardWriter:
    """Scalars into a TensorBoard event file in `directory` (the trainer's: <output_dir>/tensorboard),
    written with tensorboardX's event-file writer. Tags follow transformers' TensorBoardCallback:
    "eval_<name>" is logged as "eval/<name>", every other name as "train/<name>".

    Writes are synchronous and `flush` puts every scalar written so far on disk (tensorboardX's
    SummaryWriter writes from a thread, and its flush does not wait for the scalars still queued).
    One process writes: the trainer makes a writer on process 0 only. `purge_step`, on a resumed
    run, marks a restart there (tensorboardX's `purge_step`): TensorBoard hides what the killed run
    logged at that step and after, as the trainer drops those lines of metrics.jsonl."""

    def __init__(self, directory: str, purge_step: int | None = None):
        EventsWriter, event_pb2, summary_pb2 = tensorboardx()
        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        # Event files are named by the second they were opened in: a resumed run opened within
        # the same second would overwrite its predecessor's file. The nanoseconds keep each file
        # apart, in the order of creation in which TensorBoard reads them (purges included).
        self._writer = EventsWriter(os.path.join(directory, "events"), f".{time.time_ns():020d}")
        if purge_step is not None:
            restart = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._writer.write_event(self._event(wall_time=time.time(), step=purge_step, session_log=restart))

    def write(self, values: Mapping[str, Any], step: int) -> None:
        """One scalar per number in `values` (a metrics.jsonl record: "step" itself, booleans and
        anything that is not a number are left out), all at `step`."""
        scalars = [
            self._summary.Value(tag=_tag(name), simple_value=float(value))
            for name, value in values.items()
            if name != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool)
        ]
        if scalars:
            summary = self._summary(value=scalars)
            self._writer.write_event(self._event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tag(name: str) -> str:
    return f"eval/{name.removeprefix(EVAL_PREFIX)}" if name.startswith(EVAL_PREFIX) else f"train/{name}"


def throughput(seconds: float, tokens: int, flops: float, peak: float | None) -> dict[str, float]:
    """{"tokens_per_second", "mfu"} of one step that took `seconds` for `tokens` real (not
    padding) tokens and `flops` model FLOPs (`ettin_jax.platforms.model_flops(..., training=True)`),
    on devices whose peak FLOP/s add up to `peak` (`peak_flops` x the number of devices). "mfu"
    only when `peak` is known (not None, for a CPU or a device the table lacks)."""
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"a step's time must be a positive number of seconds, got {seconds}")
    out = {"tokens_per_second": tokens / seconds}
    if peak:
        out["mfu"] = flops / seconds / peak
    return out
