"""Token lists into arrays: BOS first, shapes rounded up to buckets, and left padding. Shared by
generation, the pipelines and the training data, so that each makes batches the same way.

Buckets are powers of two (from `MIN_BUCKET`): a stream of inputs of any length reuses a few
compiled programs instead of compiling one per length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

MIN_BUCKET = 16


def with_bos(ids: Sequence[int], bos: int | None) -> list[int]:
    """`ids` starting with BOS (Ettin saw BOS first in every training sample)."""
    ids = list(ids)
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


def bucket(n: int, minimum: int = MIN_BUCKET, maximum: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), capped at `maximum` (when n fits in it)."""
    size = max(minimum, 1 << max(0, n - 1).bit_length())
    return size if maximum is None else max(n, min(size, maximum))


@dataclasses.dataclass(frozen=True)
class Padded:
    """Token lists left-padded into a bucketed array: every row's last token in the last column."""

    ids: np.ndarray  # (Bb, Tb) int32, left-padded with the pad id
    mask: np.ndarray  # (Bb, Tb) bool, False on padding
    rows: int  # real rows; the rest (all padding) fill the batch to its bucket
    width: int  # the longest row


def left_pad(
    rows: Sequence[Sequence[int]],
    pad_id: int,
    *,
    batch_bucket: bool = True,
    batch_multiple: int = 1,
    max_width: int | None = None,
) -> Padded:
    """Left-pads `rows` to a bucketed width (at most `max_width` unless a row is longer) and, with
    `batch_bucket`, the batch to a power of two, then to a multiple of `batch_multiple` (whole
    rows for every batch shard of a mesh)."""
    width = max(len(r) for r in rows)
    length = bucket(width, maximum=max_width)
    batch = bucket(len(rows), 1) if batch_bucket else len(rows)
    batch = -(-batch // batch_multiple) * batch_multiple
    ids = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), bool)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, length - len(row) :] = row
            mask[i, length - len(row) :] = True
    return Padded(ids, mask, len(rows), width)
