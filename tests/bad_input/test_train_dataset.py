"""`train --dataset`: a dataset that cannot be loaded and a split it does not have are refused
with a message that names them, before the model is read and before anything is written."""

from __future__ import annotations

import os

import pytest
from textdata import dataset_dir

from ettin_jax.train import DataError, TrainArgs, TrainingError, train

NO_MODEL = "/nonexistent/ettin-model"  # reading it would fail: the checks must come first


@pytest.fixture
def dataset(tmp_path) -> str:
    return dataset_dir(tmp_path / "dataset", 8, 4)


def _args(tmp_path, **changes) -> TrainArgs:
    fields = dict(task="classify", model=NO_MODEL, output_dir=str(tmp_path / "out"), max_steps=1, batch_size=2,
                  max_length=16, progress=False)  # fmt: skip
    return TrainArgs(**{**fields, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dataset": "{tmp}/no-such-dataset"}, r"--dataset \S*no-such-dataset cannot be loaded \(FileNotFoundError"),
        ({"dataset": "{dataset}", "split": "validation"},
         r"--dataset \S*dataset has no split 'validation'; its splits are \['test', 'train'\]"),
        ({"dataset": "{dataset}", "eval_split": "dev"}, r"has no split 'dev'; its splits are \['test', 'train'\]"),
        ({"dataset": "{dataset}", "text_column": "sentence"},
         r"column 'sentence' is not in --dataset \S*dataset split train; its columns are \['label', 'text'\]"),
    ],
)  # fmt: skip
def test_a_dataset_that_cannot_be_read_is_named(tmp_path, dataset, changes, message):
    changes = {k: v.format(tmp=tmp_path, dataset=dataset) for k, v in changes.items()}
    args = _args(tmp_path, **changes)
    with pytest.raises(DataError, match=message) as info:
        train(args)
    assert "\n" not in str(info.value)
    assert not os.path.exists(args.output_dir)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "give exactly one of --train-file and --dataset"),
        ({"train_file": "t.csv", "dataset": "d"}, "give exactly one of --train-file and --dataset"),
        ({"train_file": "t.csv", "split": "test"}, "--split picks from --dataset: pass --dataset too"),
        ({"dataset": "d", "eval_file": "e.csv", "eval_split": "test"}, "--eval-file and --eval-split both"),
    ],
)
def test_dataset_flags_that_contradict(tmp_path, changes, message):
    with pytest.raises(TrainingError, match=message):
        _args(tmp_path, **changes)
