"""Hostile input to the trainer: data files and flags. Each bad input is refused before any
work with the library's error type (or, on the command line, exit status 2 and one line on
stderr) and a message that names the flag, the file, the row and line, or the column; the
silent wrong answers of old are now right (fractional labels train a regressor, a NaN label or a
short row is an error, not a class); and a run that fails before its first step leaves nothing
that refuses its own rerun, while a directory that held a real run is never deleted.

Flag and data errors come before the model is touched: most cases pass a model that does not
exist. Only the rerun tests train, one step of a tiny model."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from textdata import word_tokenizer, write_rows, xor_rows

from ettin_jax.cli import main
from ettin_jax.errors import EttinError
from ettin_jax.train import DataError, TrainArgs, TrainingError, train
from ettin_jax.train.data import infer_problem_type, label_names
from ettin_jax.train.stream import index_split
from ettin_jax.train.trainer import prepare

NO_MODEL = "/nonexistent/ettin-model"  # reading it would fail: the checks must come first


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    """A random tiny causal LM (transformers layout) with the word-level tokenizer of textdata."""
    from helpers import torch_model

    directory = tmp_path_factory.mktemp("word-model")
    torch_model("causal", seed=3).save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return str(directory)


def _args(tmp_path, train_file, **changes) -> TrainArgs:
    fields = dict(
        task="classify",
        model=NO_MODEL,
        train_file=str(train_file),
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        batch_size=2,
        max_length=16,
        save_steps=1,
        progress=False,
    )
    return TrainArgs(**{**fields, **changes})


def _labels(path):
    return index_split(path, text_column="text", label_column="label").labels


# ---- the silent wrong answers, now right ----------------------------------------------------
def test_fractional_labels_train_a_regressor(tmp_path, word_model):
    path = tmp_path / "scores.csv"
    path.write_text("text,label\nalpha red,0.5\nbeta blue,1.25\ngamma gold,2.0\ndelta red,0.5\n")
    values = _labels(path)
    assert values == [0.5, 1.25, 2.0, 0.5]
    assert infer_problem_type(values) == "regression" and label_names(values, "regression") == ("LABEL_0",)
    prepared = prepare(_args(tmp_path, path, model=word_model))
    assert prepared.problem_type == "regression" and prepared.label_names == ("LABEL_0",)
    assert prepared.train.labels.tolist() == [0.5, 1.25, 2.0, 0.5]
    # Whole numbers stay classes, names stay names (today's behaviour kept).
    assert infer_problem_type([0, 1, 2, 1]) == "single_label_classification"
    assert infer_problem_type(["pos", "neg"]) == "single_label_classification"


# ---- bad data: (file name, content, extra TrainArgs, error type, message) ---------------------
def _parquet_bytes(tmp_path) -> bytes:
    good = write_rows(tmp_path / "good.parquet", xor_rows(8, seed=0))
    with open(good, "rb") as f:
        return f.read()


DATA_CASES = {
    "nan label (csv)": ("t.csv", "text,label\na,0\nb,1\nc,NaN\n", {}, r"label 'NaN' in row 3 of \S*t\.csv .*\(line 4\)"),
    "inf label (csv)": ("t.csv", "text,label\na,0.5\nb,inf\n", {}, r"label 'inf' in row 2 of \S*t\.csv .*finite.*\(line 3\)"),
    "NaN literal (jsonl)": ("t.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": NaN}\n', {},
                            r"label nan in row 2 of \S*t\.jsonl .*finite number \(line 3\)"),
    "missing field (csv)": ("t.csv", "text,label\na,0\nb\nc,1\n", {}, r"row 2 of \S*t\.csv has no value in column 'label' \(line 3\)"),
    "empty label cell (csv)": ("t.csv", "text,label\na,0\nb,\n", {}, r"row 2 of \S*t\.csv has no value in column 'label' \(line 3\)"),
    "extra field (csv)": ("t.csv", "text,label\na,0\nb,1,2\n", {}, r"row 2 of \S*t\.csv has more cells than the header.*line 3"),
    "missing key (jsonl)": ("t.jsonl", '{"text": "a", "label": 0}\n{"text": "b"}\n', {},
                            r"row 2 of \S*t\.jsonl has no value in column 'label' \(line 2\)"),
    "missing text key (jsonl)": ("t.jsonl", '{"text": "a", "label": 0}\n{"label": 1}\n', {},
                                 r"row 2 of \S*t\.jsonl has no value in column 'text' \(line 2\)"),
    "empty file (csv)": ("t.csv", "", {}, r"data file \S*t\.csv has no rows: it is empty"),
    "header only (csv)": ("t.csv", "text,label\n", {}, r"data file \S*t\.csv has no rows, only a header"),
    "blank lines only (jsonl)": ("t.jsonl", "\n  \n", {}, r"data file \S*t\.jsonl has no rows"),
    "mixed numbers and names (csv)": ("t.csv", "text,label\na,0\nb,pos\nc,1\n", {},
                                      r"label 'pos' in row 2 of \S*t\.csv \(column 'label'\) is a name, but 2 of .* numbers \(line 3\)"),
    "mixed: the first row is the odd one (csv)": ("t.csv", "text,label\na,N/A\nb,0.5\nc,1.5\n", {},
                                                  r"label 'N/A' in row 1 of \S*t\.csv .*is a name.*\(line 2\)"),
    "mixed numbers and names (jsonl)": ("t.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": 2.5}\n',
                                        {}, r"label 2\.5 in row 3 of \S*t\.jsonl .*is a number, but 2 of .* names \(line 3\)"),
    "binary garbage (csv)": ("t.csv", b"text,label\na,0\n\xff\xfe\x89PNG\x00\x01,1\n", {}, r"\S*t\.csv line 3 is not UTF-8 text \(byte 0xff\)"),
    "binary garbage (jsonl)": ("t.jsonl", b'{"text": "a", "label": 0}\n\x80\x81\x82\n', {}, r"\S*t\.jsonl line 2 is not UTF-8 text"),
    "NUL characters (csv)": ("t.csv", "text,label\na,0\nb\x00c,1\n", {}, r"\S*t\.csv line 3 holds a NUL character"),
    "unclosed quote (csv)": ("t.csv", 'text,label\na,0\n"b,1\nc,0\n', {}, r"\S*t\.csv line 3 is not valid CSV"),
    "repeated header name (csv)": ("t.csv", "text,label,label\na,0,1\n", {}, r"header of \S*t\.csv \(line 1\) names column\(s\) \['label'\]"),
    "corrupt parquet": ("t.parquet", b"PAR1 this is not parquet at all PAR1", {}, r"\S*t\.parquet is not a readable Parquet file"),
    "empty parquet file": ("t.parquet", b"", {}, r"\S*t\.parquet is not a readable Parquet file"),
    "truncated parquet": ("t.parquet", "truncated", {}, r"\S*t\.parquet is not a readable Parquet file"),
    "line not JSON (jsonl)": ("t.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": \n', {}, r"\S*t\.jsonl line 2 is not JSON"),
    "line not an object (jsonl)": ("t.jsonl", '{"text": "a", "label": 0}\n["b", 1]\n', {}, r"\S*t\.jsonl line 2 is not a JSON object"),
    "huge integer (jsonl)": ("t.jsonl", '{"text": "a", "label": ' + "9" * 5000 + "}\n", {}, r"\S*t\.jsonl line 1 is not JSON"),
    "object label (jsonl)": ("t.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": {"x": 1}}\n', {},
                             r"row 2 of \S*t\.jsonl \(column 'label'\) is a JSON object.*\(line 2\)"),
    "null in a label list (jsonl)": ("t.jsonl", '{"text": "a", "label": ["x"]}\n{"text": "b", "label": [null, "x"]}\n', {},
                                     r"label list \[None, 'x'\] in row 2 of \S*t\.jsonl \(column 'label'\) holds None.*\(line 2\)"),
    "list as a text (jsonl)": ("t.jsonl", '{"text": "a", "label": 0}\n{"text": ["b", "c"], "label": 1}\n', {},
                               r"row 2 of \S*t\.jsonl has a list, not a text, in column 'text' \(line 2\)"),
    "name as a regression label": ("t.csv", "text,label\na,0.5\nb,high\n", {"problem_type": "regression"},
                                   r"regression label 'high' in row 2 of \S*t\.csv .*not a number \(line 3\)"),
    "regression label beyond float32": ("t.csv", "text,label\na,0.5\nb,1e39\n", {"problem_type": "regression"},
                                        r"regression label 1e\+39 in row 2 of \S*t\.csv .*too large for float32 \(line 3\)"),
    "unknown label column": ("t.csv", "text,labels\na,0\n", {}, r"column 'label' is not in \S*t\.csv; its columns are \['labels', 'text'\]"),
    "metric of another problem type": ("t.csv", "text,label\na,0.5\nb,1.5\n", {"metric_for_best": "eval_accuracy"},
                                       r"--metric-for-best: unknown metric 'eval_accuracy'.*regression: eval_loss, eval_mse, eval_pearson"),
}  # fmt: skip


def _write_case(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    if content == "truncated":
        content = _parquet_bytes(tmp_path)[:200]
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_is_refused_naming_file_and_line(tmp_path, case):
    name, content, changes, message = DATA_CASES[case]
    args = _args(tmp_path, _write_case(tmp_path, name, content), **changes)
    error = TrainingError if "metric" in case else DataError
    with pytest.raises(error, match=message) as info:
        train(args)  # the whole command: it fails before the model is read (NO_MODEL does not exist)
    assert isinstance(info.value, EttinError) and "\n" not in str(info.value)
    assert not os.path.exists(args.output_dir)  # and writes nothing


def test_a_bad_eval_file_is_named(tmp_path):
    train_file = write_rows(tmp_path / "train.csv", xor_rows(8, seed=0))
    rows = xor_rows(4, seed=1)
    rows[2]["label"] = "unsure"
    eval_file = write_rows(tmp_path / "eval.jsonl", rows)
    with pytest.raises(DataError, match=r"'unsure' in row 3 of \S*eval\.jsonl .*not in the label set.*\(line 3\)"):
        prepare(_args(tmp_path, train_file, eval_file=eval_file, model=None))
    garbage = tmp_path / "eval.csv"
    garbage.write_bytes(b"text\n\xc3\x28\n")
    with pytest.raises(DataError, match=r"\S*eval\.csv line 2 is not UTF-8"):
        prepare(_args(tmp_path, train_file, task="lm", eval_file=str(garbage)))


# ---- through the command line: exit status 2 and one line that names the problem -----------------
def _cli(capsys, tmp_path, *argv: str, task: str = "classify", train_file: str | None = None) -> str:
    if train_file is None:
        train_file = write_rows(tmp_path / "train.csv", xor_rows(8, seed=0))
    out = tmp_path / "run"
    flags = ["train", task, "--train-file", train_file, "--output-dir", str(out), "--model", NO_MODEL]
    if not any(a in ("--epochs", "--max-steps") for a in argv):
        flags += ["--max-steps", "1"]
    code = main([*flags, "--no-progress", "--release-host-memory", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not out.exists()  # refused before anything was written
    return lines[0]


FLAG_CASES = [
    ("classify", ["--learning-rate", "0"], "--learning-rate must be a finite number > 0, got 0.0"),
    ("classify", ["--learning-rate=-1e-4"], "--learning-rate must be a finite number > 0"),
    ("classify", ["--learning-rate", "nan"], "--learning-rate must be a finite number > 0, got nan"),
    ("classify", ["--learning-rate", "inf"], "--learning-rate must be a finite number > 0, got inf"),
    ("classify", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("classify", ["--eval-batch-size", "-2"], "--eval-batch-size must be >= 1, got -2"),
    ("classify", ["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
    ("classify", ["--log-steps", "0"], "--log-steps must be >= 1, got 0"),
    ("classify", ["--eval-steps", "0"], "--eval-steps must be >= 1, got 0"),
    ("classify", ["--save-steps", "-1"], "--save-steps must be >= 1, got -1"),
    ("classify", ["--save-total-limit", "0"], "--save-total-limit must be >= 1, got 0"),
    ("classify", ["--epochs", "0"], "--epochs must be >= 1, got 0"),
    ("lm", ["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    ("classify", ["--max-length", "1"], "--max-length must be >= 2, got 1"),
    ("lm", ["--block-size", "1"], "--block-size must be >= 2, got 1"),
    ("classify", ["--warmup-ratio", "-0.1"], "--warmup-ratio must lie in [0, 1), got -0.1"),
    ("classify", ["--warmup-ratio", "1"], "--warmup-ratio must lie in [0, 1), got 1.0"),
    ("classify", ["--warmup-ratio", "nan"], "--warmup-ratio must lie in [0, 1), got nan"),
    ("classify", ["--weight-decay", "-0.01"], "--weight-decay must be a finite number >= 0, got -0.01"),
    ("classify", ["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0, got inf"),
    ("classify", ["--max-grad-norm", "-1"], "--max-grad-norm must be a finite number >= 0 (0: no clipping), got -1.0"),
    ("classify", ["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number >= 0"),
    ("classify", ["--seed", "-1"], "--seed must lie in [0, 2**32), got -1"),
    ("classify", ["--metric-for-best", "eval_speed"], "--metric-for-best: unknown metric 'eval_speed'; the evaluation reports"),
    ("lm", ["--metric-for-best", "accuracy"], "unknown metric 'accuracy'; the evaluation reports causal_lm: eval_loss, eval_perplexity"),
    ("classify", ["--problem-type", "regression", "--metric-for-best", "eval_accuracy"],
     "unknown metric 'eval_accuracy'; the evaluation reports regression: eval_loss, eval_mse, eval_pearson"),
    ("classify", ["--text-column", ""], "--text-column must not be empty"),
    ("classify", ["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
]  # fmt: skip


@pytest.mark.parametrize(("task", "argv", "message"), FLAG_CASES, ids=[" ".join(c[1]) for c in FLAG_CASES])
def test_bad_flags_exit_2_with_one_line(capsys, tmp_path, task, argv, message):
    assert message in _cli(capsys, tmp_path, *argv, task=task)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("t.parquet", b"\x00garbage", r"t\.parquet is not a readable Parquet file"),
        ("t.csv", b"text,label\n\xff\xd8\xff\xe0,1\n", r"t\.csv line 2 is not UTF-8 text"),
        ("t.csv", "text,label\na,0\nb,1\nc,NaN\n", r"label 'NaN' in row 3 of \S*t\.csv .*\(line 4\)"),
    ],
)
def test_bad_data_through_the_command_line(capsys, tmp_path, name, content, message):
    import re

    line = _cli(capsys, tmp_path, train_file=_write_case(tmp_path, name, content))
    assert re.search(message, line), line


def test_arguments_of_the_wrong_type_from_python(tmp_path):
    with pytest.raises(TrainingError, match=r"--batch-size must be an integer, got '8'"):
        _args(tmp_path, "t.csv", batch_size="8")
    with pytest.raises(TrainingError, match=r"--learning-rate must be a number, got '1e-3'"):
        _args(tmp_path, "t.csv", learning_rate="1e-3")
    with pytest.raises(TrainingError, match=r"--max-steps must be an integer, got True"):
        _args(tmp_path, "t.csv", max_steps=True)
    assert _args(tmp_path, tmp_path / "t.csv").train_file == str(tmp_path / "t.csv")  # a Path is a path


# ---- numeric ranges, over their whole domain ---------------------------------------------------
BAD_RATES = st.one_of(st.floats(max_value=0.0), st.sampled_from([math.nan, math.inf, -math.inf]))
GOOD_RATES = st.floats(min_value=1e-12, max_value=1e3)


@settings(max_examples=60, deadline=None)
@given(rate=BAD_RATES)
def test_any_learning_rate_not_finite_and_positive_is_refused(rate):
    with pytest.raises(TrainingError, match="--learning-rate must be a finite number > 0"):
        TrainArgs(task="classify", train_file="t.csv", output_dir="o", max_steps=1, learning_rate=rate)


@settings(max_examples=30, deadline=None)
@given(rate=GOOD_RATES)
def test_any_finite_positive_learning_rate_is_taken(rate):
    assert (
        TrainArgs(task="lm", train_file="t.csv", output_dir="o", max_steps=1, learning_rate=rate).learning_rate == rate
    )


INT_FLAGS = ["epochs", "max_steps", "batch_size", "eval_batch_size", "grad_accum", "save_steps", "eval_steps",
             "save_total_limit", "log_steps"]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(INT_FLAGS), value=st.integers(max_value=0))
def test_any_count_below_one_is_refused(name, value):
    fields = dict(task="classify", train_file="t.csv", output_dir="o")
    fields["epochs" if name == "epochs" else "max_steps"] = 1
    fields[name] = value
    with pytest.raises(TrainingError, match=f"--{name.replace('_', '-')} must be >= 1, got {value}"):
        TrainArgs(**fields)


@settings(max_examples=40, deadline=None)
@given(decay=st.one_of(st.floats(max_value=-1e-300), st.sampled_from([math.nan, math.inf])))
def test_any_negative_or_non_finite_weight_decay_is_refused(decay):
    with pytest.raises(TrainingError, match="--weight-decay must be a finite number >= 0"):
        TrainArgs(task="classify", train_file="t.csv", output_dir="o", max_steps=1, weight_decay=decay)


# ---- the output directory ------------------------------------------------------------------------
def test_a_failed_run_does_not_block_its_rerun(word_model, tmp_path, monkeypatch):
    import ettin_jax.train.steps as steps

    bad = tmp_path / "train.csv"
    bad.write_text("text,label\nalpha red,same\nbeta blue\n")
    args = _args(tmp_path, bad, model=word_model)
    # 1. Bad data: refused before the output directory is made.
    with pytest.raises(DataError, match=r"row 2 of \S*train\.csv has no value in column 'label' \(line 3\)"):
        train(args)
    assert not os.path.exists(args.output_dir)

    # 2. A failure after the directory was made but before the first step: what it wrote is removed.
    write_rows(bad, xor_rows(8, seed=0))

    def broken(*_):
        raise RuntimeError("device lost")

    monkeypatch.setattr(steps, "train_step", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        train(args)
    assert not os.path.exists(args.output_dir)
    os.makedirs(args.output_dir)  # an empty directory the user made stays, and is no obstacle
    with pytest.raises(RuntimeError, match="device lost"):
        train(args)
    assert os.listdir(args.output_dir) == []
    monkeypatch.undo()

    # 3. The corrected command, as it was: it runs.
    summary = train(args)
    assert summary["status"] == "finished" and summary["step"] == 1
    assert {"run.json", "final", "checkpoints"} <= set(os.listdir(args.output_dir))


def _previous_run(tmp_path, args: TrainArgs) -> dict[str, str]:
    """A directory that holds a run: run.json, a checkpoint, metrics."""
    out = args.output_dir
    os.makedirs(os.path.join(out, "checkpoints", "2"))
    files = {
        "run.json": json.dumps(args.identity()),
        "metrics.jsonl": '{"step": 2, "loss": 0.5}\n',
        os.path.join("checkpoints", "2", "marker"): "weights",
    }
    for name, text in files.items():
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    return files


def _assert_intact(out: str, files: dict[str, str]) -> None:
    for name, text in files.items():
        with open(os.path.join(out, name)) as f:
            assert f.read() == text, name


@pytest.mark.parametrize("how", ["again", "overwrite with bad data", "resume with bad data", "resume then fail"])
def test_a_previous_run_is_never_destroyed(word_model, tmp_path, how):
    good = write_rows(tmp_path / "good.csv", xor_rows(8, seed=0))
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text,label\n\xfe\xfe,1\n")
    args = _args(tmp_path, good)
    files = _previous_run(tmp_path, args)
    if how == "again":
        with pytest.raises(TrainingError, match=r"\S*out holds a run already; pass --resume"):
            train(args)
    elif how == "overwrite with bad data":  # the old run is deleted only once the new data has been read
        with pytest.raises(DataError, match=r"\S*bad\.csv line 2 is not UTF-8"):
            train(_args(tmp_path, bad, overwrite=True))
    elif how == "resume with bad data":
        args.train_file = str(bad)
        with open(os.path.join(args.output_dir, "run.json"), "w") as f:
            f.write(files["run.json"].replace(good, str(bad)))
        files["run.json"] = files["run.json"].replace(good, str(bad))
        with pytest.raises(DataError, match=r"\S*bad\.csv line 2 is not UTF-8"):
            train(_args(tmp_path, bad, resume=True))
    else:  # resuming, it fails before its first step: the checkpoint does not restore
        resumed = _args(tmp_path, good, resume=True, model=word_model)
        with open(os.path.join(args.output_dir, "run.json"), "w") as f:
            f.write(json.dumps(resumed.identity()))
        files["run.json"] = json.dumps(resumed.identity())
        with pytest.raises(TrainingError, match=r"checkpoint 2 in \S*out/checkpoints cannot be restored"):
            train(resumed)
    _assert_intact(args.output_dir, files)


@pytest.mark.parametrize("flag", ["train_file", "eval_file", "model"])
def test_overwrite_never_deletes_an_input_inside_the_output_dir(word_model, tmp_path, flag):
    """--overwrite deletes the old run; a data file or model inside it is refused before any work."""
    good = write_rows(tmp_path / "good.csv", xor_rows(8, seed=0))
    args = _args(tmp_path, good)
    files = _previous_run(tmp_path, args)
    inside = os.path.join(args.output_dir, "data.csv") if flag != "model" else os.path.join(args.output_dir, "best")
    if flag == "model":
        shutil.copytree(word_model, inside)
    else:
        shutil.copy(good, inside)
    changes = {flag: inside} if flag != "train_file" else {}
    with pytest.raises(TrainingError, match=rf"--{flag.replace('_', '-')} \S+ is inside --output-dir \S*out"):
        train(_args(tmp_path, inside if flag == "train_file" else good, overwrite=True, **changes))
    _assert_intact(args.output_dir, files)
    assert os.path.exists(inside)
