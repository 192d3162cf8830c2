"""Training data: labels read and encoded, texts tokenized, examples served as deterministic
batches (`Batches`, `PackedBatches`). Files are read by `stream`, a row at a time.

Epoch e of a run with seed s visits the examples in the permutation drawn from (s, e), so the
data position is two integers, (epoch, index of the next batch), saved in every checkpoint:
a resumed run reads exactly the batches the uninterrupted run would have. Rows are padded to
length buckets (`ettin_jax.padding`), so a run compiles its step once per bucket rather than once
per length.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ettin_jax import padding
from ettin_jax.errors import EttinError
from ettin_jax.losses import IGNORE_INDEX

_INTEGER = re.compile(r"[+-]?\d+")


class DataError(EttinError, ValueError):
    """A data file or column that cannot be used as asked; the message names it."""


def _where(row: int, lines: Sequence[int] | None) -> str:
    """' (line N)' for the 1-based `row` when the file has lines, else ''."""
    return f" (line {lines[row - 1]})" if lines is not None and 0 < row <= len(lines) else ""


# ---- labels -------------------------------------------------------------------------------
def read_labels(values: Sequence[Any], path: str, column_name: str, lines: Sequence[int] | None = None) -> list[Any]:
    """A label column with its types restored, whatever the file format: a number as int or
    float (float for the whole column when any number in it is not whole), a JSON or Python list
    as a list of str, anything else as str (comma-separated labels stay one string until
    the multi-label reading splits them). An empty cell, a NaN or infinite number, a JSON object
    and a list with an empty, null or nested item are errors that name the row (and, given the
    file's `lines`, the line)."""
    out = [_read_label(v, row, path, column_name, lines) for row, v in enumerate(values, 1)]
    if out and all(_is_number(v) for v in out):
        whole = all(isinstance(v, int) or v.is_integer() for v in out)
        return [int(v) if whole else float(v) for v in out]
    return out


def _read_label(value: Any, row: int, path: str, column_name: str, lines: Sequence[int] | None) -> Any:
    where = f"in row {row} of {path} (column {column_name!r})"
    line = _where(row, lines)
    if isinstance(value, (list, tuple)):
        return _read_label_list(value, where, line)
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # a whole number of any size
    if _is_number(value):
        if not math.isfinite(value):
            raise DataError(f"label {value!r} {where} is not a finite number{line}")
        return value
    if isinstance(value, dict):
        raise DataError(f"label {value!r} {where} is a JSON object, not a label{line}")
    if isinstance(value, (bytes, bytearray)):
        raise DataError(f"label {where} is binary data, not a label{line}")
    text = str(value).strip()
    if not text:
        raise DataError(f"row {row} of {path} has no value in column {column_name!r}{line}")
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):  # pandas writes lists as Python literals: ['a', 'b']
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                parsed = None
        if not isinstance(parsed, list):
            raise DataError(f"label {text!r} {where} starts with '[' but is not a list{line}")
        return _read_label_list(parsed, where, line)
    if _INTEGER.fullmatch(text):
        try:
            return int(text)
        except ValueError:  # more digits than int() reads: a name
            return text
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        raise DataError(f"label {text!r} {where} is not a finite number{line}")
    return number


def _read_label_list(items: Sequence[Any], where: str, line: str) -> list[str]:
    """A multi-label row's list: each item a name or a finite number, as str."""
    out = []
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise DataError(f"label list {list(items)!r} {where} holds {item!r}, not a finite number{line}")
        if item is None or isinstance(item, (list, tuple, dict)) or not str(item).strip():
            raise DataError(f"label list {list(items)!r} {where} holds {item!r}, not a label{line}")
        out.append(str(item).strip())
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _label_list(value: Any) -> list[str]:
    """A multi-label row's labels: a list, comma-separated labels, or one label."""
    if isinstance(value, list):
        return value
    return [part.strip() for part in str(value).split(",") if part.strip()]


def infer_problem_type(
    values: Sequence[Any], path: str = "the data", column_name: str = "label", lines: Sequence[int] | None = None
) -> str:
    """For labels from `read_labels`: lists or comma-separated labels: multi-label; numbers not
    all whole (floats): regression; anything else (whole numbers, names): single-label. A column
    of numbers and names both is ambiguous: an error that names the first label of the fewer
    kind (its row and line)."""
    if any(isinstance(v, list) or (isinstance(v, str) and "," in v) for v in values):
        return "multi_label_classification"
    if values and all(isinstance(v, float) for v in values):
        return "regression"
    numbers = sum(_is_number(v) for v in values)
    if 0 < numbers < len(values):
        odd_is_number = numbers < len(values) - numbers or (
            numbers == len(values) - numbers and not _is_number(values[0])
        )
        row = next(r for r, v in enumerate(values, 1) if _is_number(v) == odd_is_number)
        kind, others = ("a number", "names") if odd_is_number else ("a name", "numbers")
        count = len(values) - numbers if odd_is_number else numbers
        raise DataError(
            f"label {values[row - 1]!r} in row {row} of {path} (column {column_name!r}) is {kind}, but "
            f"{count} of the column's {len(values)} labels are {others}{_where(row, lines)}: a label column holds "
            "numbers (regression, or classes when all are whole) or names, not both. Fix the row, or pass "
            "--problem-type single_label_classification to read every label as a name"
        )
    return "single_label_classification"


def label_names(values: Sequence[Any], problem_type: str) -> tuple[str, ...]:
    """The sorted label set of a training column (numerically when every label is an integer)."""
    if problem_type == "regression":
        return ("LABEL_0",)
    if problem_type == "multi_label_classification":
        names = {n for v in values for n in _label_list(v)}
    else:
        names = {str(v) for v in values}
    if all(_INTEGER.fullmatch(n) for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def encode_labels(
    values: Sequence[Any],
    problem_type: str,
    names: Sequence[str],
    path: str,
    column_name: str,
    lines: Sequence[int] | None = None,
) -> np.ndarray:
    """Labels from `read_labels` as (N,) class indices, (N, L) multi-hot floats, or (N,) floats
    for regression."""
    index = {n: i for i, n in enumerate(names)}

    def lookup(name: str, row: int) -> int:
        if name not in index:
            shown = list(names) if len(names) <= 20 else [*names[:20], "..."]
            raise DataError(
                f"label {name!r} in row {row + 1} of {path} (column {column_name!r}) is not in the label set {shown}"
                + _where(row + 1, lines)
            )
        return index[name]

    if problem_type == "single_label_classification":
        for i, v in enumerate(values):
            if isinstance(v, list):
                raise DataError(
                    f"label {v!r} in row {i + 1} of {path} (column {column_name!r}) is a list; "
                    f"single_label_classification takes one label per row{_where(i + 1, lines)}"
                )
        return np.array([lookup(str(v), i) for i, v in enumerate(values)], np.int32)
    if problem_type == "multi_label_classification":
        hot = np.zeros((len(values), len(names)), np.float32)
        for i, v in enumerate(values):
            for name in _label_list(v):
                hot[i, lookup(name, i)] = 1.0
        return hot
    for i, v in enumerate(values):
        where = f"in row {i + 1} of {path} (column {column_name!r})"
        if not _is_number(v):
            raise DataError(f"regression label {v!r} {where} is not a number{_where(i + 1, lines)}")
        if not abs(v) <= _FLOAT32_MAX:
            raise DataError(f"regression label {v!r} {where} is too large for float32{_where(i + 1, lines)}")
    return np.asarray(values, np.float32)


# ---- tokenizing ---------------------------------------------------------------------------
@dataclasses.dataclass
class Examples:
    """Tokenized rows: ids (N lists of int32), labels (N, ...) or None for the causal LM, and
    how many rows were truncated to the maximum length."""

    ids: list[np.ndarray]
    labels: np.ndarray | None
    truncated: int = 0
    segments: list[np.ndarray] | None = None  # packed causal-LM blocks: each row's segment ids

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_pairs(
    tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int, bos: int | None
) -> tuple[list[np.ndarray], int]:
    """Each text (and pair) as the pipelines encode it: the tokenizer's template, BOS first.
    Longer rows are truncated to max_length; returns the ids and how many were."""
    texts = [str(t) for t in texts]
    pairs = None if pairs is None else [str(p) for p in pairs]
    encoded = tokenizer(texts, pairs)["input_ids"] if pairs else tokenizer(texts)["input_ids"]
    out, truncated = [], 0
    for ids in encoded:
        ids = padding.with_bos(ids, bos)
        if len(ids) > max_length:
            truncated += 1
            ids = ids[:max_length]
        out.append(np.asarray(ids, np.int32))
    return out, truncated


def pack_blocks(
    tokenizer: Any, texts: Sequence[str], block_size: int, bos: int | None, eos: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Causal-LM packing as transformers' run_clm does it: every text as BOS + tokens + EOS,
    concatenated and cut into (N, block_size) blocks; the remainder is dropped. Returns the
    blocks and their (N, block_size) segment ids: each text's piece of a block is a segment of
    its own, numbered from 0 in each block, so that no token attends across a text's boundary."""
    encoded = tokenizer([str(t) for t in texts], add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    lengths = []
    for ids in encoded:
        ids = padding.with_bos(ids, bos) + ([] if eos is None else [eos])
        stream.extend(ids)
        lengths.append(len(ids))
    blocks = len(stream) // block_size
    if blocks == 0:
        raise DataError(f"the texts hold {len(stream)} tokens, fewer than one block of {block_size}")
    cut = blocks * block_size
    text = np.repeat(np.arange(len(lengths)), lengths)[:cut].reshape(blocks, block_size)  # which text each token is
    return np.asarray(stream[:cut], np.int32).reshape(blocks, block_size), (text - text[:, :1]).astype(np.int32)


def positions_of(segments: np.ndarray) -> np.ndarray:
    """Position ids that restart at 0 where each segment starts: (..., T) -> (..., T)."""
    index = np.broadcast_to(np.arange(segments.shape[-1]), segments.shape)
    starts = np.concatenate([np.ones_like(segments[..., :1], bool), segments[..., 1:] != segments[..., :-1]], axis=-1)
    return (index - np.maximum.accumulate(np.where(starts, index, 0), axis=-1)).astype(np.int32)


# ---- batching -----------------------------------------------------------------------------
class Batches:
    """Fixed-size batches of `micro_batch` rows x `grad_accum` micro-batches, stacked (K, B, T).

    Training (`shuffle=True`): epoch e is the permutation of (seed, e); the last incomplete batch
    of an epoch is dropped, so every batch has the same number of rows. Evaluation
    (`shuffle=False`): every row once, in order; the last batch is filled with padding rows whose
    labels are ignored, and `rows` says how many are real. Packed causal-LM blocks (examples
    with `segments`) also carry `segment_ids` and `position_ids`, and the first token of each
    segment is no target: nothing before it in the block belongs to its text.
    """

    def __init__(
        self,
        examples: Examples,
        micro_batch: int,
        pad_id: int,
        max_length: int,
        *,
        grad_accum: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if micro_batch < 1 or grad_accum < 1:
            raise DataError(f"batch size and gradient accumulation must be >= 1, got {micro_batch} and {grad_accum}")
        self.examples, self.micro_batch, self.grad_accum = examples, micro_batch, grad_accum
        self.pad_id, self.seed, self.shuffle = pad_id, seed, shuffle
        self.max_length = max_length
        rows = micro_batch * grad_accum
        if shuffle and len(examples) < rows:
            raise DataError(
                f"the training set has {len(examples)} examples, fewer than one batch of {rows} "
                f"(batch size {micro_batch} x gradient accumulation {grad_accum})"
            )
        self.rows = rows
        self._count = len(examples) // rows if shuffle else math.ceil(len(examples) / rows)

    def count(self, epoch: int) -> int:
        """The number of batches in `epoch` (the same in every epoch here; not in `PackedBatches`)."""
        return self._count

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.examples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def batch(self, epoch: int, index: int, order: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], int]:
        """Batch `index` of `epoch` as numpy arrays, and how many of its rows are real."""
        order = self.order(epoch) if order is None else order
        chosen = order[index * self.rows : (index + 1) * self.rows]
        ids = [self.examples.ids[i] for i in chosen]
        length = padding.bucket(max(len(r) for r in ids), maximum=self.max_length)
        input_ids = np.full((self.rows, length), self.pad_id, np.int32)
        mask = np.zeros((self.rows, length), np.int32)
        for r, row in enumerate(ids):
            input_ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        out = {"input_ids": input_ids, "attention_mask": mask}
        if self.examples.labels is None:  # causal LM: predict the next token, not padding
            labels = np.where(mask == 1, input_ids, IGNORE_INDEX).astype(np.int32)
            if self.examples.segments is not None:  # packed blocks: every row full, no padding
                out["segment_ids"] = np.zeros((self.rows, length), np.int32)
                out["segment_ids"][: len(chosen)] = [self.examples.segments[i] for i in chosen]
                out["position_ids"] = positions_of(out["segment_ids"])
                labels[:, 1:][out["position_ids"][:, 1:] == 0] = IGNORE_INDEX
        else:
            real = self.examples.labels[chosen]
            labels = np.zeros((self.rows, *real.shape[1:]), real.dtype)
            if real.dtype == np.int32:
                labels[:] = IGNORE_INDEX
            labels[: len(real)] = real
        out["labels"] = labels
        return _stack(out, self.grad_accum), len(chosen)

    def epoch(self, epoch: int, start: int = 0):
        """Batches start, start + 1, ... of an epoch."""
        order = self.order(epoch)
        for index in range(start, self.count(epoch)):
            yield self.batch(epoch, index, order)


def _stack(batch: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """(K * B, ...) arrays as K stacked micro-batches (K, B, ...)."""
    return {name: x.reshape(k, x.shape[0] // k, *x.shape[1:]) for name, x in batch.items()}


class PackedBatches(Batches):
    """Training batches of rows that each pack several examples (`train classify --pack`).

    Epoch e lays the permutation of (seed, e) into rows of at most `max_length` tokens, each
    example into the first of the last `OPEN_ROWS` rows it fits in (so that rows fill up while
    the order stays random), then cuts the rows into batches of `micro_batch` x `grad_accum`
    rows; the last incomplete batch is dropped. A batch holds `input_ids`, `attention_mask`,
    `segment_ids` and `position_ids` (K, B, T); `pool_positions` (K, B, S), each example's last
    token; `labels` (K, B, S, ...) and `slots` (K, B, S), 1.0 where a slot holds an example.
    S, the examples in the fullest row, is rounded up to a power of two, T to a bucket.
    """

    OPEN_ROWS = 8

    def __init__(self, examples: Examples, micro_batch: int, pad_id: int, max_length: int, *, grad_accum: int = 1,
                 seed: int = 0):  # fmt: skip
        super().__init__(examples, micro_batch, pad_id, max_length, grad_accum=grad_accum, seed=seed, shuffle=True)
        self.lengths = self._lengths()  # (N,) each example's tokens
        longer = np.flatnonzero(self.lengths > max_length)
        if len(longer):
            raise DataError(
                f"example {longer[0] + 1} has {self.lengths[longer[0]]} tokens, more than --max-length {max_length}: "
                "--pack puts whole examples in rows of --max-length tokens. Raise --max-length, or train without "
                "--pack, which truncates"
            )
        self._plans: dict[int, list[list[int]]] = {}
        if self.count(0) == 0:
            raise DataError(
                f"the training set packs into {len(self.plan(0))} rows of {max_length} tokens, fewer than one batch "
                f"of {self.rows} (batch size {micro_batch} x gradient accumulation {grad_accum})"
            )

    def _lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.examples.ids], np.int64)

    def plan(self, epoch: int) -> list[list[int]]:
        """The rows of `epoch`, each a list of example indices."""
        if epoch not in self._plans:
            self._plans = {epoch: self._pack(self.order(epoch))}  # one epoch is read at a time
        return self._plans[epoch]

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        rows: list[list[int]] = []
        room: list[int] = []  # free tokens of each row
        for i in order.tolist():
            n = int(self.lengths[i])
            first = max(0, len(rows) - self.OPEN_ROWS)
            row = next((r for r in range(first, len(rows)) if room[r] >= n), None)
            if row is None:
                rows.append([])
                room.append(self.max_length)
                row = len(rows) - 1
            rows[row].append(i)
            room[row] -= n
        return rows

    def count(self, epoch: int) -> int:
        return len(self.plan(epoch)) // self.rows

    def batch(self, epoch: int, index: int, order: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], int]:
        rows = self.plan(epoch)[index * self.rows : (index + 1) * self.rows]
        ids = self.examples.ids
        length = padding.bucket(max(sum(len(ids[i]) for i in row) for row in rows), maximum=self.max_length)
        slots = padding.bucket(max(len(row) for row in rows), minimum=1)
        shape = (self.rows, length)
        input_ids, mask = np.full(shape, self.pad_id, np.int32), np.zeros(shape, np.int32)
        segment_ids = np.full(shape, slots, np.int32)  # padding: a segment no example has
        pool = np.zeros((self.rows, slots), np.int32)
        labels = self.examples.labels
        out_labels = np.zeros((self.rows, slots, *labels.shape[1:]), labels.dtype)
        if labels.dtype == np.int32:
            out_labels[:] = IGNORE_INDEX
        filled = np.zeros((self.rows, slots), np.float32)
        for r, row in enumerate(rows):
            at = 0
            for s, i in enumerate(row):
                n = len(ids[i])
                input_ids[r, at : at + n] = ids[i]
                mask[r, at : at + n] = 1
                segment_ids[r, at : at + n] = s
                pool[r, s] = at + n - 1
                out_labels[r, s] = labels[i]
                filled[r, s] = 1.0
                at += n
        batch = {
            "input_ids": input_ids, "attention_mask": mask, "segment_ids": segment_ids,
            "position_ids": positions_of(segment_ids), "pool_positions": pool, "labels": out_labels, "slots": filled,
        }  # fmt: skip
        return _stack(batch, self.grad_accum), int(filled.sum())
