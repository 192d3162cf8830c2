"""Training data that need not fit in memory: a row index, rows read and tokenized as batches need them.

One pass over each split (`index_split`) checks every row, with `data`'s messages and line
numbers, and keeps only a byte range per row (16 bytes) plus the raw label column; a Parquet file
or a `--dataset` is first copied, used columns only, to a JSONL file in a temporary directory.
Training then reads a batch's rows with `os.pread` and tokenizes them in worker threads a few
batches ahead (`TokenizedRows`, `StreamBatches`). The data position stays `data.Batches`'s
(epoch, index of the next batch): which rows a batch holds depends on the seed and the step
only, so a resume is exact and does not depend on the number of processes. Each process
tokenizes only the rows its own devices hold (`held_rows`); the others stay padding, which
`sharding.put_batch` never reads.

Why not grain: the position is already two integers in the checkpoint's JSON item, valid for
any process count, whereas grain's orbax handler saves one iterator state per process and
refuses another process count; and grain's thread boundary costs ~150 µs per element, so it
would only have served as a thread pool for whole batches, which `concurrent.futures` is.
"""

from __future__ import annotations

import array
import atexit
import codecs
import concurrent.futures
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from ettin_jax import padding, sharding
from ettin_jax.losses import IGNORE_INDEX
from ettin_jax.train.data import Batches, DataError, Examples, PackedBatches, _is_number, _stack, read_labels

log = logging.getLogger("ettin_jax.train")

_CHUNK = 256  # rows tokenized in one call
_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")  # one line, universal newlines


# ---- the row index --------------------------------------------------------------------------
class RowIndex:
    """Rows of one split: row i is bytes starts[i]:ends[i] of `path`, a JSON object (kind
    "json") or a CSV record under `header` (kind "csv"). `name` is how messages name the data,
    `lines` the line of the source file each row starts on (None where it has no lines),
    `labels` the label column's values from `data.read_labels` (None without a label column),
    and `fingerprint` a hash of the bytes the rows are read from (what a resumed run checks its
    data against)."""

    def __init__(self, path: str, name: str, kind: str, starts: Sequence[int], ends: Sequence[int],
                 lines: Sequence[int] | None, header: list[str] | None = None, labels: list[Any] | None = None,
                 fingerprint: str = ""):  # fmt: skip
        self.path, self.name, self.kind, self.header, self.labels = path, name, kind, header, labels
        self.fingerprint = fingerprint
        self.starts, self.ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
        self.lines = None if lines is None else np.asarray(lines, np.int32)
        self._local = threading.local()  # one file descriptor per thread

    def __len__(self) -> int:
        return len(self.starts)

    def row(self, i: int) -> dict[str, Any]:
        fd = getattr(self._local, "fd", None)
        if fd is None:
            fd = self._local.fd = os.open(self.path, os.O_RDONLY)
        start, end = int(self.starts[i]), int(self.ends[i])
        text = os.pread(fd, end - start, start).decode("utf-8")
        if self.kind == "json":
            return json.loads(text)
        cells = next(csv.reader(io.StringIO(text, newline=""), strict=True))
        return {name: cells[c] if c < len(cells) else None for c, name in enumerate(self.header)}

    def texts(self, rows: Sequence[int], column: str) -> list[str]:
        """The column's texts (a number as its text) of `rows`, checked by the index pass."""
        return [str(self.row(int(i))[column]) for i in rows]


class _Checks:
    """The checks of the used columns, a row at a time: each is in the file, has a value in
    every row, and a text column holds texts (a number is its text); the labels are read with
    `data.read_labels`. The first problem of each kind is kept and raised by `finish`, column by
    column, so that a file's message names the first row at fault, whatever comes after it."""

    def __init__(self, name: str, texts: Sequence[str], label: str | None):
        self.name, self.texts, self.label = name, [t for t in texts if t], label
        self.columns: dict[str, None] = {}
        self.missing: dict[str, tuple[int, int | None]] = {}
        self.wrong: dict[str, tuple[int, int | None, str]] = {}
        self.values: list[Any] = []
        self.lines = array.array("i")
        self.rows = 0
        self.digest = hashlib.blake2b(digest_size=16)  # of every byte the index pass reads or copies

    def add(self, row: dict[str, Any], line: int | None) -> None:
        self.rows += 1
        if line is not None:
            self.lines.append(line)
        if len(self.columns) < 10_000:
            self.columns.update(dict.fromkeys(row))
        for name in self.texts:
            value = row.get(name)
            if value is None:
                self.missing.setdefault(name, (self.rows, line))
            elif not isinstance(value, str) and not _is_number(value):
                self.wrong.setdefault(name, (self.rows, line, type(value).__name__))
        if self.label:
            value = row.get(self.label)
            if value is None:
                self.missing.setdefault(self.label, (self.rows, line))
            self.values.append(value)

    def finish(self) -> list[Any] | None:
        """The labels as `data.read_labels` reads them; raises the first problem found."""
        for name in [*self.texts, *([self.label] if self.label else [])]:
            if name not in self.columns:
                raise DataError(f"column {name!r} is not in {self.name}; its columns are {sorted(self.columns)}")
            if name in self.missing:
                row, line = self.missing[name]
                where = "" if line is None else f" (line {line})"
                raise DataError(f"row {row} of {self.name} has no value in column {name!r}{where}")
            if name in self.wrong:
                row, line, kind = self.wrong[name]
                where = "" if line is None else f" (line {line})"
                raise DataError(f"row {row} of {self.name} has a {kind}, not a text, in column {name!r}{where}")
        if not self.label:
            return None
        return read_labels(self.values, self.name, self.label, self.lines if len(self.lines) else None)


def index_split(
    path: str | None = None,
    *,
    dataset: str | None = None,
    config: str | None = None,
    split: str | None = None,
    text_column: str,
    pair_column: str | None = None,
    label_column: str | None = None,
) -> RowIndex:
    """The index of a .csv, .jsonl or .parquet file, or of `split` of `datasets.load_dataset(dataset,
    config)`, after one pass that checks every row: a problem is a `DataError` that names the file
    or dataset, and the row and line (an empty or header-only file, bytes that are not UTF-8, a
    NUL character, malformed CSV, a row with more cells than the header, a repeated header name,
    a JSON line that is not an object, an unreadable Parquet file, a missing column or value, a
    bad label)."""
    if dataset is not None:
        return _index_dataset(dataset, config, split or "train", text_column, pair_column, label_column)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    checks = _Checks(path, [text_column, pair_column or ""], label_column)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        starts, ends = _scan_jsonl(path, checks)
        return RowIndex(path, path, "json", starts, ends, checks.lines, labels=checks.finish(),
                        fingerprint=checks.digest.hexdigest())  # fmt: skip
    if ext == ".csv":
        starts, ends, header = _scan_csv(path, checks)
        return RowIndex(path, path, "csv", starts, ends, checks.lines, header, labels=checks.finish(),
                        fingerprint=checks.digest.hexdigest())  # fmt: skip
    if ext == ".parquet":
        return _copy_rows(path, _parquet_rows(path, checks), checks)
    raise DataError(f"cannot read {path}: expected a .csv, .jsonl or .parquet file")


def _decode(raw: bytes, path: str, line: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x}); is it a binary file? "
            "Save the data as UTF-8"
        ) from None
    if "\0" in text:
        raise DataError(f"{path} line {line} holds a NUL character; is it a binary file?")
    return text


def _scan_jsonl(path: str, checks: _Checks) -> tuple[array.array, array.array]:
    starts, ends = array.array("q"), array.array("q")
    with open(path, "rb") as f:
        at = 0
        for number, raw in enumerate(f, 1):
            checks.digest.update(raw)
            start, at = at, at + len(raw)
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[3:], start + 3
            line = _decode(raw, path, number)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise DataError(f"{path} line {number} is not JSON: {e} (expected one JSON object per line)") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number} is not a JSON object (expected one JSON object per line)")
            checks.add(row, number)
            starts.append(start)
            ends.append(at)
    if not starts:
        raise DataError(f"data file {path} has no rows: it holds no JSON object")
    return starts, ends


def _scan_csv(path: str, checks: _Checks) -> tuple[array.array, array.array, list[str]]:
    at = [0, 0]  # bytes read, lines read

    def lines() -> Iterator[str]:
        with open(path, "rb") as f:
            for raw in f:
                checks.digest.update(raw)
                for piece in _LINE.findall(raw):
                    if at[1] == 0 and piece.startswith(codecs.BOM_UTF8):
                        piece = piece[3:]
                        at[0] += 3
                    at[0] += len(piece)
                    at[1] += 1
                    yield _decode(piece, path, at[1])

    reader = csv.reader(lines(), strict=True)
    header: list[str] | None = None
    starts, ends = array.array("q"), array.array("q")
    while True:
        line, start = reader.line_num + 1, at[0]
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{path} line {line} is not valid CSV: {e}") from None
        if not cells:
            continue
        if header is None:
            header = cells
            repeated = sorted({name for name in cells if cells.count(name) > 1})
            if repeated:
                raise DataError(f"the header of {path} (line {line}) names column(s) {repeated} more than once")
            checks.columns = dict.fromkeys(header)
            continue
        if len(cells) > len(header):
            raise DataError(
                f"row {len(starts) + 1} of {path} has more cells than the header has columns "
                f"(line {line}: {len(cells)} cells, {len(header)} columns)"
            )
        checks.add({name: cells[c] if c < len(cells) else None for c, name in enumerate(header)}, line)
        starts.append(start)
        ends.append(at[0])
    if header is None:
        raise DataError(f"data file {path} has no rows: it is empty")
    if not starts:
        raise DataError(f"data file {path} has no rows, only a header")
    return starts, ends, header


def _parquet_rows(path: str, checks: _Checks) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq  # the "train" extra
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install 'ettin-jax[train]'") from None
    try:
        file = pq.ParquetFile(path)
        checks.columns = dict.fromkeys(file.schema_arrow.names)
        used = [c for c in [*checks.texts, checks.label] if c and c in checks.columns]
        if file.metadata.num_rows == 0:
            raise DataError(f"data file {path} has no rows")
        for batch in file.iter_batches(batch_size=1024, columns=used):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path} is not a readable Parquet file: {e}") from None


def _index_dataset(name: str, config: str | None, split: str, text: str, pair: str | None,
                   label: str | None) -> RowIndex:  # fmt: skip
    try:
        import datasets
    except ImportError:
        raise DataError(f"--dataset {name} needs the datasets library: pip install 'ettin-jax[train]'") from None
    what = f"--dataset {name}" + (f" (config {config})" if config else "")
    try:
        splits = datasets.get_dataset_split_names(name, config)
    except Exception as e:  # datasets raises many types for a name it cannot resolve
        raise DataError(f"{what} cannot be loaded ({type(e).__name__}: {_one_line(e)})") from None
    if split not in splits:
        raise DataError(f"{what} has no split {split!r}; its splits are {sorted(splits)}")
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:
        raise DataError(f"{what} cannot be loaded ({type(e).__name__}: {_one_line(e)})") from None
    checks = _Checks(f"{what} split {split}", [text, pair or ""], label)
    if getattr(rows, "column_names", None):
        checks.columns = dict.fromkeys(rows.column_names)
        rows = rows.select_columns([c for c in [text, pair, label] if c and c in checks.columns])
    return _copy_rows(checks.name, iter(rows), checks)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _copy_rows(name: str, rows: Iterator[dict[str, Any]], checks: _Checks) -> RowIndex:
    """Rows without a file to index in place (Parquet, a dataset), checked and copied to a
    JSONL file in this process's temporary directory."""
    path = os.path.join(_scratch(), f"{len(os.listdir(_scratch()))}.jsonl")
    starts, ends = array.array("q"), array.array("q")
    with open(path, "wb") as f:
        at = 0
        for row in rows:
            checks.add(row, None)
            raw = (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")
            f.write(raw)
            checks.digest.update(raw)
            starts.append(at)
            at += len(raw)
            ends.append(at)
    if not starts:
        raise DataError(f"data file {name} has no rows")
    return RowIndex(
        path, name, "json", starts, ends, None, labels=checks.finish(), fingerprint=checks.digest.hexdigest()
    )


_SCRATCH: list[str] = []


def _scratch() -> str:
    if not _SCRATCH:
        _SCRATCH.append(tempfile.mkdtemp(prefix="ettin-data-"))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return _SCRATCH[0]


# ---- tokenizing on demand -------------------------------------------------------------------
class TokenizedRows(Sequence):
    """Row i's ids as `data.tokenize_pairs` gives them, tokenized when asked for: by `load`
    (from worker threads, a batch ahead; `drop` forgets them once used) or, for a row not
    loaded, with the next rows in order (evaluation reads in order). Only the loaded rows are
    held. `lengths` (token counts, for packing) is filled by `count_tokens`."""

    def __init__(self, index: RowIndex, tokenizer: Any, text_column: str, pair_column: str | None,
                 max_length: int, bos: int | None, split: str = "train"):  # fmt: skip
        self.index, self.tokenizer, self.max_length, self.bos, self.split = index, tokenizer, max_length, bos, split
        self.text_column, self.pair_column = text_column, pair_column
        self.lengths: np.ndarray | None = None
        self.truncated = 0
        self._loaded: dict[int, np.ndarray] = {}
        self._window: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.index)

    def encode(self, rows: Sequence[int]) -> list[np.ndarray]:
        rows = [int(i) for i in rows]
        if not rows:
            return []
        texts = self.index.texts(rows, self.text_column)
        pairs = self.index.texts(rows, self.pair_column) if self.pair_column else None
        encoded = self.tokenizer(texts, pairs)["input_ids"] if pairs else self.tokenizer(texts)["input_ids"]
        out = []
        for ids in encoded:
            ids = padding.with_bos(ids, self.bos)
            if len(ids) > self.max_length:
                with self._lock:
                    if not self.truncated:
                        log.warning("%s texts longer than --max-length %d tokens are truncated",
                                    self.split, self.max_length)  # fmt: skip
                    self.truncated += 1
                ids = ids[: self.max_length]
            out.append(np.asarray(ids, np.int32))
        return out

    def load(self, rows: Sequence[int]) -> None:
        ids = self.encode(rows)
        with self._lock:
            self._loaded.update(zip((int(i) for i in rows), ids, strict=True))

    def drop(self, rows: Sequence[int]) -> None:
        with self._lock:
            for i in rows:
                self._loaded.pop(int(i), None)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        with self._lock:
            found = self._loaded.get(i, self._window.get(i))
        if found is None:
            rows = range(i, min(i + _CHUNK, len(self)))
            self._window = dict(zip(rows, self.encode(rows), strict=True))
            found = self._window[i]
        return found

    def count_tokens(self, threads: int) -> np.ndarray:
        """Every row's token count (after truncation), tokenized in `threads` threads."""
        chunks = [range(a, min(a + _CHUNK, len(self))) for a in range(0, len(self), _CHUNK)]
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            counts = pool.map(lambda rows: [len(ids) for ids in self.encode(rows)], chunks)
            self.lengths = np.fromiter((n for chunk in counts for n in chunk), np.int32, len(self))
        return self.lengths


def data_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# ---- training batches -----------------------------------------------------------------------
def held_rows(mesh: Any, micro_batch: int, grad_accum: int) -> np.ndarray | None:
    """The rows of a (K * B)-row global batch, K = grad_accum micro-batches of B, whose data
    lives on this process's devices once `sharding.put_batch(batch, mesh, axis=1)` places it;
    None where that is every row (no mesh, or one process)."""
    if mesh is None or jax.process_count() == 1:
        return None
    shape = (grad_accum, micro_batch, 1)
    indices = sharding.batch_sharding(mesh, 3, axis=1, size=micro_batch).addressable_devices_indices_map(shape)
    rows = set()
    for index in indices.values():
        for b in range(*index[1].indices(micro_batch)):
            rows.update(k * micro_batch + b for k in range(grad_accum))
    return np.array(sorted(rows), np.int64)


def agree_length(local: int) -> int:
    """The longest row of a batch over every process (each sees only its own rows)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(local))))


class _Ahead:
    """Tokenizes the rows of the next `ahead` batches of an epoch in worker threads."""

    ahead = 2

    def _start(self, threads: int) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="ettin-data")
        self._pending: dict[tuple[int, int], tuple[concurrent.futures.Future, np.ndarray]] = {}

    def _mine(self, epoch: int, index: int) -> np.ndarray:
        raise NotImplementedError

    def _ready(self, epoch: int, index: int) -> np.ndarray:
        """This process's rows of batch `index`, tokenized; starts on the next ones."""
        rows = self._mine(epoch, index)
        pending = self._pending.pop((epoch, index), None)
        if pending is None:
            for future, stale in self._pending.values():  # a jump (a resume): forget what was read ahead
                future.result()
                self.examples.ids.drop(stale)
            self._pending.clear()
            self.examples.ids.load(rows)
        else:
            pending[0].result()
        for ahead in range(index + 1, min(index + 1 + self.ahead, self.count(epoch))):
            if (epoch, ahead) not in self._pending:
                later = self._mine(epoch, ahead)
                self._pending[epoch, ahead] = (self._pool.submit(self.examples.ids.load, later), later)
        return rows


class StreamBatches(_Ahead, Batches):
    """`data.Batches` over `TokenizedRows`: the same batches (the same permutation per epoch,
    the same length buckets), each process filling only its `held` rows; the others are
    padding with ignored labels. The batch length is agreed over the processes."""

    def __init__(self, examples: Examples, micro_batch: int, pad_id: int, max_length: int, *, grad_accum: int = 1,
                 seed: int = 0, held: np.ndarray | None = None, threads: int | None = None):  # fmt: skip
        super().__init__(examples, micro_batch, pad_id, max_length, grad_accum=grad_accum, seed=seed)
        self.held = held
        self._orders: dict[int, np.ndarray] = {}
        self._start(threads or data_threads())

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: super().order(epoch)}  # one epoch at a time
        return self._orders[epoch]

    def _mine(self, epoch: int, index: int) -> np.ndarray:
        chosen = self.order(epoch)[index * self.rows : (index + 1) * self.rows]
        return chosen if self.held is None else chosen[self.held]

    def batch(self, epoch: int, index: int, order: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], int]:
        chosen = self.order(epoch)[index * self.rows : (index + 1) * self.rows]
        mine = self._ready(epoch, index)
        positions = np.arange(len(chosen)) if self.held is None else self.held
        ids = [self.examples.ids[i] for i in mine]
        length = padding.bucket(agree_length(max(len(r) for r in ids)), maximum=self.max_length)
        input_ids = np.full((self.rows, length), self.pad_id, np.int32)
        mask = np.zeros((self.rows, length), np.int32)
        for r, row in zip(positions, ids, strict=True):
            input_ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        self.examples.ids.drop(mine)
        real = self.examples.labels[chosen]
        labels = np.zeros((self.rows, *real.shape[1:]), real.dtype)
        if real.dtype == np.int32:
            labels[:] = IGNORE_INDEX
        labels[: len(real)] = real
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        return _stack(out, self.grad_accum), len(chosen)


class PackedStream(_Ahead, PackedBatches):
    """`data.PackedBatches` over `TokenizedRows` whose `lengths` are counted: epochs are
    planned from the lengths alone, and a batch's examples are tokenized a batch ahead."""

    def __init__(self, examples: Examples, micro_batch: int, pad_id: int, max_length: int, *, grad_accum: int = 1,
                 seed: int = 0, threads: int | None = None):  # fmt: skip
        self._threads = threads or data_threads()
        self._start(self._threads)
        PackedBatches.__init__(self, examples, micro_batch, pad_id, max_length, grad_accum=grad_accum, seed=seed)

    def _lengths(self) -> np.ndarray:
        """Counted once, in worker threads, unless known already."""
        ids = self.examples.ids
        return ids.lengths if ids.lengths is not None else ids.count_tokens(self._threads)

    def _mine(self, epoch: int, index: int) -> np.ndarray:
        rows = self.plan(epoch)[index * self.rows : (index + 1) * self.rows]
        return np.array([i for row in rows for i in row], np.int64)

    def batch(self, epoch: int, index: int, order: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], int]:
        mine = self._ready(epoch, index)
        out = super().batch(epoch, index, order)
        self.examples.ids.drop(mine)
        return out


# ---- causal-LM blocks -----------------------------------------------------------------------
class _Blocks(Sequence):
    """Block b of a token file: tokens b*T:(b+1)*T, read when asked for."""

    def __init__(self, path: str, dtype: np.dtype, block: int, count: int):
        self.path, self.dtype, self.block, self.count = path, np.dtype(dtype), block, count
        self._local = threading.local()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, b: int) -> np.ndarray:  # type: ignore[override]
        if not 0 <= b < self.count:
            raise IndexError(b)
        fd = getattr(self._local, "fd", None)
        if fd is None:
            fd = self._local.fd = os.open(self.path, os.O_RDONLY)
        size = self.block * self.dtype.itemsize
        raw = os.pread(fd, size, int(b) * size)
        return np.frombuffer(raw, self.dtype).astype(np.int32)


class _Segments(Sequence):
    """Block b's segment ids, as `data.pack_blocks` numbers them: from the texts' end offsets."""

    def __init__(self, ends: np.ndarray, block: int, count: int):
        self.ends, self.block, self.count = ends, block, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, b: int) -> np.ndarray:  # type: ignore[override]
        if not 0 <= b < self.count:
            raise IndexError(b)
        text = np.searchsorted(self.ends, np.arange(int(b) * self.block, (int(b) + 1) * self.block), side="right")
        return (text - text[0]).astype(np.int32)


def lm_blocks(index: RowIndex, tokenizer: Any, text_column: str, block: int, bos: int | None, eos: int | None,
              threads: int | None = None) -> Examples:  # fmt: skip
    """`data.pack_blocks` of a split's texts, as Examples whose blocks are read from a token
    file when asked for: the texts are tokenized once, in worker threads, into the file."""
    dtype = np.uint16 if len(tokenizer) <= 65536 else np.uint32
    path = os.path.join(_scratch(), f"{len(os.listdir(_scratch()))}.tokens")
    ends = array.array("q")
    total = 0

    def encode(rows: range) -> list[list[int]]:
        texts = index.texts(rows, text_column)
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [padding.with_bos(ids, bos) + ([] if eos is None else [eos]) for ids in encoded]

    chunks = [range(a, min(a + _CHUNK, len(index))) for a in range(0, len(index), _CHUNK)]
    with open(path, "wb") as f, concurrent.futures.ThreadPoolExecutor(threads or data_threads()) as pool:
        for encoded in pool.map(encode, chunks):
            for ids in encoded:
                f.write(np.asarray(ids, dtype).tobytes())
                total += len(ids)
                ends.append(total)
    count = total // block
    if count == 0:
        raise DataError(f"the texts hold {total} tokens, fewer than one block of {block}")
    ends = np.asarray(ends, np.int64)
    return Examples(ids=_Blocks(path, dtype, block, count), labels=None, segments=_Segments(ends, block, count))
