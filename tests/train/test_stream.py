"""Data read and tokenized as training needs it: each row, label and line read back, the same
tokens, blocks and batches as tokenizing a list in memory, each process tokenizing only its own
rows, --dataset, and memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from textdata import dataset_dir, word_tokenizer, write_rows, xor_rows

from ettin_jax.train import TrainArgs, stream, train
from ettin_jax.train.data import (
    Batches,
    Examples,
    PackedBatches,
    pack_blocks,
    tokenize_pairs,
)


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_the_index_reads_each_row_and_its_line(tmp_path, ext):
    rows = [{"text": f"alpha w{i} red", "label": v} for i, v in enumerate([2, 10, 0.0, 2, 1])]
    rows[1]["text"] = 'quoted "w1",\nover two lines' if ext == "csv" else "w1 \u00e9"
    path = write_rows(tmp_path / f"data.{ext}", rows)
    index = stream.index_split(path, text_column="text", label_column="label")
    assert len(index) == 5
    assert index.texts(range(5), "text") == [r["text"] for r in rows]
    assert index.labels == [2, 10, 0, 2, 1] and all(type(v) is int for v in index.labels)  # whole numbers: classes
    lines = {"csv": [2, 3, 5, 6, 7], "jsonl": [1, 2, 3, 4, 5], "parquet": None}[ext]
    assert (index.lines is None) if lines is None else index.lines.tolist() == lines


def test_tokenized_rows_equal_tokenize_pairs(tmp_path):
    rows = xor_rows(300, seed=0)  # more than one chunk
    path = write_rows(tmp_path / "data.jsonl", rows)
    tok = word_tokenizer()
    lazy = stream.TokenizedRows(stream.index_split(path, text_column="text"), tok, "text", None, 6, 1)
    ids, truncated = tokenize_pairs(tok, [r["text"] for r in rows], None, 6, 1)
    assert all(np.array_equal(lazy[i], ids[i]) for i in range(300))
    assert lazy.truncated == truncated > 0
    np.testing.assert_array_equal(lazy.count_tokens(2), [len(r) for r in ids])


def test_lm_blocks_equal_pack_blocks(tmp_path):
    rows = xor_rows(50, seed=1)
    path = write_rows(tmp_path / "data.csv", rows)
    tok = word_tokenizer()
    blocks, segments = pack_blocks(tok, [r["text"] for r in rows], 16, 1, 2)
    examples = stream.lm_blocks(stream.index_split(path, text_column="text"), tok, "text", 16, 1, 2, threads=2)
    assert len(examples) == len(blocks)
    np.testing.assert_array_equal(np.stack(list(examples.ids)), blocks)
    np.testing.assert_array_equal(np.stack(list(examples.segments)), segments)


def _classify(tmp_path, n=64) -> tuple[Examples, Examples]:
    """The same examples in memory and streamed."""
    rows = xor_rows(n, seed=2)
    path = write_rows(tmp_path / "data.jsonl", rows)
    tok = word_tokenizer()
    labels = np.array([r["label"] == "same" for r in rows], np.int32)
    ids, _ = tokenize_pairs(tok, [r["text"] for r in rows], None, 16, 1)
    lazy = stream.TokenizedRows(stream.index_split(path, text_column="text"), tok, "text", None, 16, 1)
    return Examples(ids, labels), Examples(lazy, labels)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_streamed_batches_equal_batches_read_whole(tmp_path):
    memory, lazy = _classify(tmp_path)
    ref = Batches(memory, 4, 0, 16, grad_accum=2, seed=5)
    streamed = stream.StreamBatches(lazy, 4, 0, 16, grad_accum=2, seed=5, threads=2)
    for epoch, index in [(0, 0), (0, 1), (0, 5), (1, 0), (0, 7), (3, 2)]:  # in order, and jumps (a resume)
        _same(streamed.batch(epoch, index)[0], ref.batch(epoch, index)[0])
    for future, _ in streamed._pending.values():
        future.result()
    ahead = {int(i) for _, rows in streamed._pending.values() for i in rows}
    assert set(lazy.ids._loaded) == ahead  # only the rows read ahead are held; used ones are forgotten
    packed = stream.PackedStream(lazy, 2, 0, 16, seed=5, threads=2)
    ref = PackedBatches(memory, 2, 0, 16, seed=5)
    assert packed.count(0) == ref.count(0)
    for epoch, index in [(0, 0), (0, 1), (1, 3)]:
        _same(packed.batch(epoch, index)[0], ref.batch(epoch, index)[0])


@pytest.mark.parametrize("processes", [2, 4])
def test_each_process_tokenizes_only_its_rows(tmp_path, monkeypatch, processes):
    """Simulated processes, each holding a contiguous share of the rows (as `held_rows` gives
    them for a data axis across hosts): each tokenizes only its share, and the rows each
    places assemble into the one-process batch."""
    memory, lazy = _classify(tmp_path)
    rows = 8  # batch 4 x grad_accum 2
    ref = Batches(memory, 4, 0, 16, grad_accum=2, seed=5)
    tokenized: list[int] = []
    encode = lazy.ids.encode
    monkeypatch.setattr(lazy.ids, "encode", lambda r: tokenized.extend(int(i) for i in r) or encode(r))
    # No reading ahead: a worker thread tokenizing the next batch would add its rows to `tokenized`.
    monkeypatch.setattr(stream.StreamBatches, "ahead", 0)
    for epoch, index in [(0, 2), (1, 0)]:
        want, _ = ref.batch(epoch, index)
        chosen = ref.order(epoch)[index * rows : (index + 1) * rows]
        # What the processes agree on: the longest row of the whole batch.
        longest = max(len(memory.ids[i]) for i in chosen)
        monkeypatch.setattr(stream, "agree_length", lambda n, longest=longest: longest)
        assembled = {k: np.zeros_like(v.reshape(rows, *v.shape[2:])) for k, v in want.items()}
        for held in np.array_split(np.arange(rows), processes):
            tokenized.clear()
            batches = stream.StreamBatches(lazy, 4, 0, 16, grad_accum=2, seed=5, held=held, threads=1)
            batch, _ = batches.batch(epoch, index)
            assert sorted(tokenized) == sorted(chosen[held].tolist())  # its rows, and no other
            for name, value in batch.items():
                assembled[name][held] = value.reshape(rows, *value.shape[2:])[held]
        for name, value in want.items():
            np.testing.assert_array_equal(assembled[name], value.reshape(rows, *value.shape[2:]), err_msg=name)


def test_a_dataset_directory_trains(word_model, tmp_path):
    args = TrainArgs(
        task="classify", model=word_model, dataset=dataset_dir(tmp_path / "dataset", 64, 16), eval_split="test",
        output_dir=str(tmp_path / "out"), max_steps=3, batch_size=8, save_steps=3, max_length=16, progress=False,
    )  # fmt: skip
    summary = train(args)
    assert summary["status"] == "finished" and summary["step"] == 3
    with open(os.path.join(args.output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert "eval_accuracy" in records[-1]
    assert os.path.isfile(os.path.join(args.output_dir, "final", "model.safetensors"))


# ---- memory -------------------------------------------------------------------------------------
_RUN = """
import sys
from ettin_jax.train import TrainArgs, train
train(TrainArgs(task="classify", model=sys.argv[1], train_file=sys.argv[2], output_dir=sys.argv[3], max_steps=4,
                batch_size=8, max_length=16, save_steps=100, progress=False))
print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
"""


def _peak_rss_mib(word_model, data: str, out: str) -> float:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", _RUN, word_model, data, out], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1]) / 1024


def _jsonl(path, megabytes: int) -> str:
    """About `megabytes` MB of rows (1000 distinct ones, repeated), written in large pieces."""
    rows = xor_rows(1000, seed=3)
    for r in rows:
        r["text"] += " " + " ".join(["w1 w2 w3 w4"] * 60)  # about 1 kB a row
    piece = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with open(path, "wb") as f:
        for _ in range(-(-megabytes * 1_000_000 // len(piece))):
            f.write(piece)
    return str(path)


def test_memory_a_200_mb_file_costs_less_than_200_mb_more_than_a_1_mb_file(word_model, tmp_path):
    """The memory test: peak resident memory (VmHWM) of a short training run on a 200 MB
    JSONL file against the same run on a 1 MB file."""
    small = _peak_rss_mib(word_model, _jsonl(tmp_path / "small.jsonl", 1), str(tmp_path / "small"))
    big_file = _jsonl(tmp_path / "big.jsonl", 200)
    assert os.path.getsize(big_file) >= 200_000_000
    big = _peak_rss_mib(word_model, big_file, str(tmp_path / "big"))
    print(f"peak RSS: 1 MB file {small:.0f} MiB, 200 MB file {big:.0f} MiB")
    assert big - small < 200, (small, big)
