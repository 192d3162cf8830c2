"""Reading, labels, tokenizing and batching of training data."""

from __future__ import annotations

import numpy as np
import pytest
from textdata import word_tokenizer, write_rows, xor_rows

from ettin_jax.padding import bucket
from ettin_jax.train.data import (
    Batches,
    DataError,
    Examples,
    encode_labels,
    infer_problem_type,
    label_names,
    pack_blocks,
    read_labels,
    tokenize_pairs,
)
from ettin_jax.train.stream import index_split


def labels_of(path):
    """The label column of a file, as training reads it (`stream.index_split`)."""
    return index_split(path, text_column="text", label_column="label").labels


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_each_format_reads_the_same_rows(tmp_path, ext):
    rows = xor_rows(5, seed=0)
    index = index_split(write_rows(tmp_path / f"data.{ext}", rows), text_column="text", label_column="label")
    assert index.texts(range(5), "text") == [r["text"] for r in rows]
    assert index.labels == [r["label"] for r in rows]


def test_labels_by_problem_type():
    assert infer_problem_type(["pos", "neg"]) == "single_label_classification"
    assert infer_problem_type([1, 0, 2]) == "single_label_classification"
    assert infer_problem_type([0.5, 1.0]) == "regression"
    assert infer_problem_type([["a"], ["a", "b"]]) == "multi_label_classification"
    assert infer_problem_type(["a,b", "c"]) == "multi_label_classification"
    assert label_names([10, 9, 2], "single_label_classification") == ("2", "9", "10")  # numeric order
    names = label_names(["b,a", "c"], "multi_label_classification")
    assert names == ("a", "b", "c")
    hot = encode_labels(["b,a", ["c"], "a"], "multi_label_classification", names, "f", "labels")
    np.testing.assert_array_equal(hot, [[1, 1, 0], [0, 0, 1], [1, 0, 0]])
    assert encode_labels([1.5, 2], "regression", ("LABEL_0",), "f", "y").tolist() == [1.5, 2.0]
    with pytest.raises(DataError, match=r"label 'maybe' in row 2 of eval.csv \(column 'label'\) is not in"):
        encode_labels(["yes", "maybe"], "single_label_classification", ("no", "yes"), "eval.csv", "label")
    with pytest.raises(DataError, match=r"regression label 'x' in row 1 of f \(column 'y'\) is not a number"):
        encode_labels(["x"], "regression", ("LABEL_0",), "f", "y")
    with pytest.raises(DataError, match=r"row 2 of f \(column 'y'\) is a list; single_label_classification"):
        encode_labels(["a", ["a", "b"]], "single_label_classification", ("a", "b"), "f", "y")


# Each problem type's labels as written in each format: CSV holds strings only.
TYPED = {
    "single_label_classification": dict(
        csv=["2", "10", "2", "0"], json=[2, 10, 2.0, 0], names=("0", "2", "10"), encoded=[1, 2, 1, 0]
    ),
    "multi_label_classification": dict(
        csv=["b,a", '["c"]', "['a', 'c']"],  # comma-separated, a JSON list, a Python list (pandas)
        json=[["b", "a"], ["c"], ["a", "c"]],
        names=("a", "b", "c"),
        encoded=[[1, 1, 0], [0, 0, 1], [1, 0, 1]],
    ),
    "regression": dict(csv=["1", "2.5", "-0.25"], json=[1, 2.5, -0.25], names=("LABEL_0",), encoded=[1.0, 2.5, -0.25]),
}


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("problem", list(TYPED))
def test_label_columns_are_typed_in_every_format(tmp_path, ext, problem):
    case = TYPED[problem]
    labels = case["csv"] if ext == "csv" else case["json"]
    path = write_rows(tmp_path / f"data.{ext}", [{"text": f"w{i}", "label": v} for i, v in enumerate(labels)])
    values = labels_of(path)
    assert infer_problem_type(values) == problem
    names = label_names(values, problem)
    assert names == case["names"]
    np.testing.assert_array_equal(encode_labels(values, problem, names, path, "label"), case["encoded"])


def test_whole_numbers_are_classes_and_any_fraction_makes_a_column_float():
    assert read_labels(["1", 2.0, 3], "f", "y") == [1, 2, 3]
    assert read_labels(["1", 2, "0.5"], "f", "y") == [1.0, 2.0, 0.5]
    assert all(type(v) is float for v in read_labels(["1", 2, "0.5"], "f", "y"))
    assert read_labels(["a", "1"], "f", "y") == ["a", 1]  # names stay names


@pytest.mark.parametrize(
    ("ext", "cell", "message"),
    [
        ("csv", "nan", r"label 'nan' in row 2 of .*data\.csv \(column 'label'\) is not a finite number"),
        ("jsonl", float("inf"), r"label inf in row 2 of .*data\.jsonl \(column 'label'\) is not a finite number"),
        ("parquet", float("nan"), r"label nan in row 2 of .*data\.parquet \(column 'label'\) is not a finite"),
        ("csv", "", r"row 2 of .*data\.csv has no value in column 'label'"),
        ("jsonl", None, r"row 2 of .*data\.jsonl has no value in column 'label'"),
        ("parquet", None, r"row 2 of .*data\.parquet has no value in column 'label'"),
    ],
)
def test_bad_labels_name_the_row(tmp_path, ext, cell, message):
    rows = [{"text": "a", "label": 0.5}, {"text": "b", "label": cell}, {"text": "c", "label": 1.5}]
    path = write_rows(tmp_path / f"data.{ext}", rows)
    with pytest.raises(DataError, match=message):
        labels_of(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", None, "does not exist"),
        ("empty.csv", "text,label\n", r"empty\.csv has no rows"),
        ("bad.jsonl", '{"text": "a"}\nnot json\n', r"bad\.jsonl line 2 is not JSON"),
        ("data.txt", "x", r"expected a \.csv, \.jsonl or \.parquet"),
        ("short.csv", "text,label\na,1\nb\n", r"row 2 of .*short\.csv has no value in column 'label' \(line 3\)"),
        ("long.csv", "text,label\na,1\nb,2,3\n", r"row 2 of .*long\.csv has more cells than the header"),
        ("keys.jsonl", '{"text": "a"}\n{"text": "b", "label": 1}\n', r"row 1 of .*keys\.jsonl has no value in column"),
    ],
)
def test_unreadable_files_and_rows_are_named(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        labels_of(tmp_path / name)


def test_truncation_keeps_the_start_and_counts():
    tok = word_tokenizer()
    ids, truncated = tokenize_pairs(tok, ["alpha w1 w2 red", "beta red"], None, max_length=3, bos=1)
    assert truncated == 1
    assert [len(r) for r in ids] == [3, 3]
    assert ids[0].tolist() == [1, *tok("alpha w1", add_special_tokens=False)["input_ids"]]


def test_packing_cuts_blocks_like_run_clm():
    tok = word_tokenizer()
    blocks, segments = pack_blocks(tok, ["alpha", "beta blue gold", "red"], block_size=4, bos=1, eos=2)
    stream = [1, *tok("alpha")["input_ids"], 2, 1, *tok("beta blue gold")["input_ids"], 2, 1, *tok("red")["input_ids"]]
    assert blocks.tolist() == [stream[:4], stream[4:8]]  # 11 tokens: the last 3 are dropped
    assert segments.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0]]  # a text's piece is a segment of its block
    with pytest.raises(DataError, match="fewer than one block of 64"):
        pack_blocks(tok, ["alpha"], block_size=64, bos=1, eos=2)


def _examples(n: int) -> Examples:
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 50, rng.integers(2, 20)).astype(np.int32) for _ in range(n)]
    return Examples(ids, np.arange(n, dtype=np.int32))


def test_batches_are_a_deterministic_permutation_per_epoch():
    data = _examples(20)
    batches = Batches(data, micro_batch=3, pad_id=0, max_length=32, grad_accum=2, seed=7)
    assert batches.count(0) == 3  # 20 // 6; the incomplete last batch is dropped
    seen = [b["labels"].reshape(-1) for b, _ in batches.epoch(0)]
    again = [b["labels"].reshape(-1) for b, _ in batches.epoch(0)]
    np.testing.assert_array_equal(np.concatenate(seen), np.concatenate(again))
    assert len(set(np.concatenate(seen).tolist())) == 18  # no row twice in an epoch
    other_epoch = np.concatenate([b["labels"].reshape(-1) for b, _ in batches.epoch(1)])
    other_seed = Batches(data, 3, 0, 32, grad_accum=2, seed=8)
    assert not np.array_equal(np.concatenate(seen), other_epoch)
    assert not np.array_equal(
        np.concatenate(seen), np.concatenate([b["labels"].reshape(-1) for b, _ in other_seed.epoch(0)])
    )
    # Resuming at batch 2 gives the same batch as reading through.
    resumed, _ = batches.batch(0, 2)
    np.testing.assert_array_equal(resumed["input_ids"], list(batches.epoch(0))[2][0]["input_ids"])


def test_batches_pad_to_buckets_with_masks():
    data = _examples(20)
    batch, rows = Batches(data, 4, pad_id=0, max_length=40, seed=0).batch(0, 0)
    assert rows == 4
    length = batch["input_ids"].shape[-1]
    lengths = batch["attention_mask"].sum(-1).reshape(-1)
    assert length in (16, 32, 40) and length == bucket(int(lengths.max()), maximum=40)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()


def test_eval_batches_cover_every_row_once_and_mark_padding():
    data = _examples(10)
    batches = Batches(data, 4, pad_id=0, max_length=32, shuffle=False)
    out = list(batches.epoch(0))
    assert [rows for _, rows in out] == [4, 4, 2]
    labels = out[-1][0]["labels"].reshape(-1)
    assert labels.tolist() == [8, 9, -100, -100]


def test_lm_labels_ignore_padding():
    data = Examples([np.array([5, 6, 7], np.int32), np.array([8, 9], np.int32)], None)
    batch, _ = Batches(data, 2, pad_id=0, max_length=16, shuffle=False).batch(0, 0)
    assert batch["labels"][0, 1, :3].tolist() == [8, 9, -100]


def test_too_few_examples_for_one_batch():
    with pytest.raises(DataError, match=r"has 5 examples, fewer than one batch of 8 \(batch size 4 x gradient"):
        Batches(_examples(5), 4, 0, 16, grad_accum=2)
