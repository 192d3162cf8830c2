"""Packing: several documents or examples per row, kept apart by segment ids.

A packed causal-LM block must give each document the logits it gets alone, and a packed
classifier batch the loss and gradients of the same examples unpacked."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import VOCAB

from ettin_jax import ModernBertDecoderForSequenceClassification
from ettin_jax.losses import row_losses
from ettin_jax.train.data import Batches, DataError, Examples, PackedBatches, pack_blocks, positions_of
from ettin_jax.train.optim import OptimizerConfig, make_optimizer
from ettin_jax.train.steps import create_train_state, gradients

PAD, BOS, EOS = 0, 1, 2


class _Tokenizer:
    """Texts of space-separated integers are those token ids."""

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[int(t) for t in text.split()] for text in texts]}


def _texts(lengths: list[int], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(str(t) for t in rng.integers(3, VOCAB, n)) for n in lengths]


def test_positions_restart_at_each_segment():
    segments = np.array([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_of(segments), [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]])


def test_pack_blocks_numbers_each_text_piece():
    blocks, segments = pack_blocks(_Tokenizer(), ["5 6", "7", "8 9 10"], 4, BOS, EOS)
    # The stream: 1 5 6 2 | 1 7 2 1 | 8 9 10 2 (the last text is cut off by no remainder here)
    np.testing.assert_array_equal(blocks, [[1, 5, 6, 2], [1, 7, 2, 1], [8, 9, 10, 2]])
    np.testing.assert_array_equal(segments, [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])


@pytest.fixture(scope="module")
def causal(causal_pair):
    return causal_pair[1]


def test_packed_block_equals_each_document_alone(causal):
    """Logits of every document's tokens in a packed block equal those of the document alone,
    past the sliding window (documents longer than it) and across every layer kind; so do the
    losses."""
    texts = _texts([9, 3, 6, 14, 6])  # with BOS and EOS: 11 + 5 + 8 and 16 + 8, two blocks of 24
    blocks, segments = pack_blocks(_Tokenizer(), texts, 24, BOS, EOS)
    examples = Examples(ids=list(blocks), labels=None, segments=list(segments))
    batch, _ = Batches(examples, len(blocks), PAD, 24, shuffle=False).batch(0, 0)
    batch = {k: v[0] for k, v in batch.items()}
    packed = np.asarray(
        causal(batch["input_ids"], batch["attention_mask"], position_ids=batch["position_ids"],
               segment_ids=batch["segment_ids"]).logits
    )  # fmt: skip
    checked = 0
    for row in range(len(blocks)):
        for segment in np.unique(segments[row]):
            where = np.flatnonzero(segments[row] == segment)
            alone = np.asarray(causal(blocks[row][where][None]).logits)[0]
            np.testing.assert_allclose(packed[row, where], alone, atol=2e-5, rtol=0)
            checked += 1
    assert checked > len(blocks)  # some block holds more than one document
    # No target crosses a boundary: each segment's first token is not predicted, and the block's
    # loss is the sum of each document's own.
    starts = batch["position_ids"][:, 1:] == 0
    assert starts.any() and (batch["labels"][:, 1:][starts] == -100).all()
    sums, counts = row_losses("causal_lm", packed, batch["labels"])
    alone_sums = alone_counts = 0.0
    for text in texts:
        ids = np.array([BOS, *map(int, text.split()), EOS], np.int32)[None]
        s, c = row_losses("causal_lm", causal(ids).logits, ids)
        alone_sums, alone_counts = alone_sums + float(s[0]), alone_counts + float(c[0])
    assert float(np.sum(counts)) == alone_counts
    np.testing.assert_allclose(float(np.sum(sums)), alone_sums, rtol=1e-5)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    from helpers import torch_model

    models = {}
    for kind, labels in (("single_label_classification", 3), ("multi_label_classification", 3), ("regression", 1)):
        directory = tmp_path_factory.mktemp(kind)
        torch_model("classify", seed=4, num_labels=labels, problem_type=kind).save_pretrained(directory)
        models[kind] = ModernBertDecoderForSequenceClassification.from_pretrained(directory)
    return models


def _labels(kind: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    if kind == "single_label_classification":
        return rng.integers(0, 3, n).astype(np.int32)
    if kind == "multi_label_classification":
        return rng.integers(0, 2, (n, 3)).astype(np.float32)
    return rng.normal(size=n).astype(np.float32)


@pytest.mark.parametrize("kind", ["single_label_classification", "multi_label_classification", "regression"])
def test_packed_classifier_loss_and_gradients_equal_unpacked(classifiers, kind):
    lengths = [5, 12, 3, 9, 7, 4, 11, 6, 2, 8, 10, 5]
    rng = np.random.default_rng(2)
    ids = [np.concatenate([[BOS], rng.integers(3, VOCAB, n - 1)]).astype(np.int32) for n in lengths]
    examples = Examples(ids=ids, labels=_labels(kind, len(ids)))
    packed = PackedBatches(examples, 2, PAD, 24, grad_accum=2)
    plan = packed.plan(0)
    assert max(len(row) for row in plan) > 1 and packed.count(0) == 1
    used = sorted(i for row in plan[: packed.rows] for i in row)
    batch, real = packed.batch(0, 0)
    assert real == len(used)
    state = create_train_state(classifiers[kind], make_optimizer(OptimizerConfig()), seed=0)
    total, count, grads = gradients(state, batch, jax.random.PRNGKey(0))

    # The same examples unpacked, one per row, in one micro-batch.
    alone = Examples(ids=[ids[i] for i in used], labels=examples.labels[used])
    plain, _ = Batches(alone, len(used), PAD, 24, shuffle=False).batch(0, 0)
    want_total, want_count, want_grads = gradients(state, plain, jax.random.PRNGKey(0))
    assert float(count) == float(want_count) > 0
    np.testing.assert_allclose(float(total) / float(count), float(want_total) / float(want_count), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        scale = max(float(np.abs(want).max()), 1e-3)
        np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=1e-5, rtol=0)


def test_pack_refuses_an_example_longer_than_a_row():
    ids = [np.arange(3, 8, dtype=np.int32), np.arange(3, 20, dtype=np.int32)]
    with pytest.raises(DataError, match=r"example 2 has 17 tokens, more than --max-length 16.*--pack"):
        PackedBatches(Examples(ids=ids, labels=np.zeros(2, np.int32)), 1, PAD, 16)


def test_packing_fills_rows_better_than_padding():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(3.0, 0.8, 400).astype(int), 2, 128)
    ids = [np.full(n, 5, np.int32) for n in lengths]
    examples = Examples(ids=ids, labels=np.zeros(len(ids), np.int32))
    padded, packed = Batches(examples, 8, PAD, 128), PackedBatches(examples, 8, PAD, 128)

    def fill(batches):
        real = total = 0
        for batch, _ in batches.epoch(0):
            real, total = real + batch["attention_mask"].sum(), total + batch["attention_mask"].size
        return real / total

    assert fill(packed) > 0.9 > fill(padded) + 0.2


def test_an_epoch_packed_short_of_a_batch_is_skipped():
    """Each epoch packs its own shuffle, so one may fall short of a whole batch: the trainer's
    data position moves past it to the next epoch's first batch."""
    from ettin_jax.train.trainer import _advance

    ids = [np.full(n, 5, np.int32) for n in (12, 5, 8, 3, 15, 3)]
    batches = PackedBatches(Examples(ids=ids, labels=np.zeros(len(ids), np.int32)), 4, PAD, 16, seed=722)
    counts = [batches.count(epoch) for epoch in range(4)]
    assert counts == [1, 1, 0, 1]
    assert _advance({"epoch": 1, "index": 0}, batches) == {"epoch": 3, "index": 0}
