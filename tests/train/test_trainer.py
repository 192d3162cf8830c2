"""The fine-tuning loop: learning, export to transformers, exact resume, SIGTERM, bad input."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import traverse_util
from helpers import exported_params, run_records
from textdata import write_rows, xor_rows

from ettin_jax.errors import EttinError
from ettin_jax.train import PREEMPTED_EXIT, DataError, TrainArgs, TrainingError, train
from ettin_jax.train.trainer import prepare


def _args(word_model, tmp_path, **changes) -> TrainArgs:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    defaults = dict(
        task="classify",
        model=word_model,
        train_file=write_rows(data / "train.csv", xor_rows(512, seed=0)),
        eval_file=write_rows(data / "eval.csv", xor_rows(128, seed=1)),
        output_dir=str(tmp_path / "out"),
        max_steps=120,
        batch_size=16,
        learning_rate=3e-3,
        warmup_ratio=0.1,
        schedule="cosine",
        weight_decay=0.01,
        save_steps=40,
        max_length=16,
        progress=False,
    )
    return TrainArgs(**{**defaults, **changes})


def test_learns_a_task_decided_by_words_far_apart(word_model, tmp_path):
    """The label is the XOR of the first and last word, 4-9 tokens apart (beyond the 4-token
    window): only the global layers can combine them. Chance is 50%."""
    args = _args(word_model, tmp_path)
    summary = train(args)
    evals = [r for r in run_records(args.output_dir) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [40, 80, 120]
    assert evals[-1]["eval_accuracy"] >= 0.95, evals
    assert summary["best"]["step"] == min(evals, key=lambda r: r["eval_loss"])["step"]
    out = args.output_dir
    assert sorted(os.listdir(out)) == ["best", "checkpoints", "final", "metrics.jsonl", "metrics.png", "run.json"]
    with open(os.path.join(out, "metrics.png"), "rb") as f:
        assert f.read(4) == b"\x89PNG"

    # transformers loads the exported model and reproduces our eval predictions.
    import torch
    import transformers

    from ettin_jax import pipeline

    final = os.path.join(out, "final")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert type(theirs).__name__ == "ModernBertDecoderForSequenceClassification"
    assert theirs.config.id2label == {0: "diff", 1: "same"}
    classifier = pipeline("text-classification", model=final)
    rows = xor_rows(128, seed=1)
    texts = [r["text"] for r in rows]
    ours = classifier.scores(texts)  # softmax probabilities
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    logits = []
    for text in texts:
        ids = [theirs.config.bos_token_id, *tokenizer(text)["input_ids"]]
        with torch.no_grad():
            logits.append(theirs(torch.tensor([ids])).logits[0].numpy())
    logits = np.stack(logits)
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(ours, probabilities, atol=1e-5)
    labels = np.array([theirs.config.label2id[r["label"]] for r in rows])
    assert np.mean(logits.argmax(-1) == labels) == evals[-1]["eval_accuracy"]


def test_epoch_strategies_early_stopping_and_best_model_at_end(word_model, tmp_path):
    """Evaluation and checkpoints at each epoch's end; at a learning rate too small to change the
    accuracy, patience 2 stops the run at the third evaluation, and final/ is the best (first)."""
    data = tmp_path / "data"
    data.mkdir()
    args = _args(
        word_model, tmp_path, train_file=write_rows(data / "small.csv", xor_rows(64, seed=0)), max_steps=None,
        epochs=20, learning_rate=1e-9, metric_for_best="accuracy", eval_strategy="epoch", save_strategy="epoch",
        early_stopping_patience=2, load_best_model_at_end=True,
    )  # fmt: skip
    summary = train(args)
    evals = [r for r in run_records(args.output_dir) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]  # 64 rows / 16 per batch: 4 steps per epoch
    assert summary["status"] == "stopped early" and summary["step"] == 12 and summary["best"]["step"] == 4
    assert sorted(int(n) for n in os.listdir(os.path.join(args.output_dir, "checkpoints"))) == [4, 8, 12]
    final, best = (exported_params(os.path.join(args.output_dir, d)) for d in ("final", "best"))
    assert final.keys() == best.keys() and all(np.array_equal(final[k], best[k]) for k in final)
    # Resumed, a run that stopped early stays stopped: no step more.
    args.resume = True
    summary = train(args)
    assert summary["status"] == "stopped early" and summary["step"] == 12
    assert [r["step"] for r in run_records(args.output_dir) if "eval_accuracy" in r] == [4, 8, 12]


def test_packed_lora_learns_exports_merged_and_peft_and_logs_to_tensorboard(word_model, tmp_path, monkeypatch):
    """LoRA rank 4 (and the new head) on the XOR task, packed (--pack), with balanced class weights
    and label smoothing: it learns; its checkpoints hold only what trained; final/ is a merged transformers
    checkpoint and final/adapter a PEFT adapter that peft loads to the same logits; TensorBoard
    holds the learning rate, tokens/s and MFU (a peak patched in: this CPU has none)."""
    import torch
    import transformers
    from peft import PeftModel
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ettin_jax import platforms

    monkeypatch.setattr(platforms, "peak_flops", lambda device, dtype: 1e12)
    args = _args(
        word_model, tmp_path, lora_rank=4, learning_rate=1e-2, class_weights="auto", label_smoothing=0.05,
        report_to="tensorboard", pack=True, max_length=32,
    )  # fmt: skip
    train(args)
    out = args.output_dir
    evals = [r for r in run_records(out) if "eval_accuracy" in r]
    assert evals[-1]["eval_accuracy"] >= 0.95, evals
    assert all(r["mfu"] > 0 and r["tokens_per_second"] > 0 for r in run_records(out)[1:] if "loss" in r)

    import orbax.checkpoint as ocp

    saved = ocp.StandardCheckpointer().metadata(os.path.join(out, "checkpoints", "120", "state"))
    names = {"/".join(map(str, path)) for path in traverse_util.flatten_dict(saved.item_metadata.tree["params"])}
    assert names and all("lora" in n or n.split("/")[0] in ("head", "classifier") for n in names), sorted(names)

    final = os.path.join(out, "final")
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(final).eval()
    base = transformers.AutoModelForSequenceClassification.from_pretrained(word_model, num_labels=2).eval()
    adapted = PeftModel.from_pretrained(base, os.path.join(final, "adapter")).eval()
    ids = torch.tensor([[1, 5, 9, 14, 22, 7], [1, 30, 31, 6, 8, 40]])
    with torch.no_grad():
        want, got = merged(ids).logits.numpy(), adapted(ids).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(want).max() > 0.1  # not a trivial head

    events = EventAccumulator(os.path.join(out, "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/tokens_per_second", "train/mfu", "eval/accuracy"} <= tags
    assert [e.step for e in events.Scalars("train/learning_rate")] == list(range(1, 121))
    assert [e.step for e in events.Scalars("train/tokens_per_second")] == list(range(2, 121))  # step 1 compiles


def _stop_at(step: int, how: str):
    def on_step(current: int, metrics: dict) -> None:
        if current == step:
            if how == "crash":
                raise KeyboardInterrupt("killed")
            os.kill(os.getpid(), signal.SIGTERM)

    return on_step


@pytest.fixture(scope="module")
def reference(word_model, tmp_path_factory):
    """An uninterrupted 10-step run with gradient accumulation, dropout-free, evaluated at 4 and 8."""
    tmp = tmp_path_factory.mktemp("reference")
    args = _args(word_model, tmp, max_steps=10, save_steps=4, batch_size=4, grad_accum=2, log_steps=1)
    train(args)
    return args, exported_params(os.path.join(args.output_dir, "final")), run_records(args.output_dir)


@pytest.mark.parametrize("how", ["crash", "sigterm"])
def test_stopped_run_resumes_to_identical_params(word_model, tmp_path, reference, how):
    """Killed after step 6 (last checkpoint: step 4), or sent SIGTERM at step 6 (which saves
    step 6), then resumed: the same params, bit for bit, and the same metrics log. CPU float32
    runs the same operations in the same order, so nothing less than equality is expected."""
    ref_args, ref_params, ref_records = reference
    args = _args(
        word_model,
        tmp_path,
        **{k: getattr(ref_args, k) for k in ("max_steps", "save_steps", "batch_size", "grad_accum", "log_steps")},
    )
    args.train_file, args.eval_file = ref_args.train_file, ref_args.eval_file
    if how == "crash":
        with pytest.raises(KeyboardInterrupt):
            train(args, on_step=_stop_at(6, how))
        assert sorted(os.listdir(os.path.join(args.output_dir, "checkpoints"))) == ["4"]
    else:
        summary = train(args, on_step=_stop_at(6, how))
        assert summary["status"] == "preempted" and summary["step"] == 6
        assert "6" in os.listdir(os.path.join(args.output_dir, "checkpoints"))
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was put back
    with pytest.raises(TrainingError, match="holds a run already; pass --resume"):
        train(args)
    args.resume = True
    summary = train(args)
    assert summary["status"] == "finished" and summary["step"] == 10
    params = exported_params(os.path.join(args.output_dir, "final"))
    assert params.keys() == ref_params.keys()
    for key in params:
        np.testing.assert_array_equal(params[key], ref_params[key], err_msg=key)
    assert _untimed(run_records(args.output_dir)) == _untimed(ref_records)


def _untimed(records: list[dict]) -> list[dict]:
    """Records without their throughput, which differs from run to run."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_second", "mfu")} for r in records]


def test_stopped_lora_run_resumes_to_identical_adapters(word_model, tmp_path):
    """A LoRA run (with LoRA dropout) killed after step 5 resumes from its step-4 checkpoint,
    which holds only the adapters and the head, to the adapters of a run never stopped."""
    from safetensors.numpy import load_file

    common = dict(
        max_steps=8, save_steps=4, batch_size=4, lora_rank=4, lora_dropout=0.1, learning_rate=1e-2, eval_file=None
    )
    whole = _args(word_model, tmp_path, **common, output_dir=str(tmp_path / "whole"))
    train(whole)
    args = _args(word_model, tmp_path, **common, output_dir=str(tmp_path / "stopped"))
    with pytest.raises(KeyboardInterrupt):
        train(args, on_step=_stop_at(5, "crash"))
    args.resume = True
    train(args)
    want, got = (
        load_file(os.path.join(a.output_dir, "final", "adapter", "adapter_model.safetensors")) for a in (whole, args)
    )
    assert got.keys() == want.keys() and any("lora_B" in k for k in got)
    for key in got:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_resume_refuses_changed_arguments(word_model, tmp_path, reference):
    args = _args(word_model, tmp_path, max_steps=2, save_steps=1)
    os.makedirs(args.output_dir)
    with open(os.path.join(args.output_dir, "run.json"), "w") as f:
        json.dump({**args.identity(), "learning_rate": 1.0}, f)
    args.resume = True
    with pytest.raises(TrainingError, match=r"different run.*learning_rate: 1\.0 -> 0\.003"):
        train(args)


def test_resume_refuses_data_changed_since_the_checkpoint(word_model, tmp_path, caplog):
    """A resume reads the batches the run would have read only from the same data: a training
    file edited after the checkpoint is refused, by name, the run left as it was; put back, the
    run resumes, with a warning for evaluation data that changed."""
    args = _args(word_model, tmp_path, max_steps=4, save_steps=2, batch_size=4, eval_steps=100)
    with pytest.raises(KeyboardInterrupt):
        train(args, on_step=_stop_at(3, "crash"))
    with open(args.train_file, "rb") as f:
        original = f.read()
    write_rows(args.train_file, xor_rows(512, seed=5))
    args.resume = True
    with pytest.raises(TrainingError, match=r"train data .*train\.csv is not the data checkpoint 2 was made with"):
        train(args)
    assert os.listdir(os.path.join(args.output_dir, "checkpoints")) == ["2"]
    with open(args.train_file, "wb") as f:
        f.write(original)
    write_rows(args.eval_file, xor_rows(128, seed=6))  # other evaluation data: a warning only
    with caplog.at_level(logging.WARNING, logger="ettin_jax.train"):
        assert train(args)["step"] == 4
    assert "the eval data" in caplog.text and "not comparable" in caplog.text


def test_output_dir_with_other_files_is_refused(word_model, tmp_path):
    args = _args(word_model, tmp_path, overwrite=True)
    os.makedirs(args.output_dir)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="holds no ettin-jax run"):
        train(args)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(lora_targets=r".*\.q_proj"), r"--lora-targets is a LoRA setting: pass --lora-rank too"),
        (dict(lora_rank=0), r"--lora-rank must be >= 1, got 0"),
        (dict(lora_rank=4, lora_targets="(attn"), r"--lora-targets '\(attn' is not a regular expression"),
        (dict(lora_rank=4, lora_dropout=1.0), r"--lora-dropout must lie in \[0, 1\), got 1.0"),
        (dict(label_smoothing=1.0), r"--label-smoothing must lie in \[0, 1\), got 1.0"),
        (dict(threshold=0.0), r"--threshold must lie in \(0, 1\), got 0.0"),
        (dict(class_weights="1,heavy"), r"--class-weights must be auto or comma-separated numbers"),
        (dict(class_weights="0,0"), r"--class-weights must be finite numbers >= 0, not all 0"),
        (dict(early_stopping_patience=2, eval_file=None), r"--early-stopping-patience .* pass --eval-file"),
    ],
)
def test_fine_tuning_flags_are_checked(word_model, tmp_path, changes, message):
    with pytest.raises(TrainingError, match=message):
        _args(word_model, tmp_path, **changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(lora_rank=4, lora_targets=r".*\.query"),
         r'--lora-targets: the LoRA targets regex ".\*\\.query" matches no Linear layer .* model\.layers\.0\.attn\.q_proj'),
        (dict(pack=True, max_length=8), r"example \d+ has \d+ tokens, more than --max-length 8: --pack puts whole examples"),
        (dict(class_weights="1,2,3"), r"--class-weights gives 3 weights for 2 classes \(diff, same\)"),
    ],
)  # fmt: skip
def test_fine_tuning_input_that_the_data_refutes_writes_nothing(word_model, tmp_path, changes, message):
    args = _args(word_model, tmp_path, **changes)
    with pytest.raises(EttinError, match=message):
        train(args)
    assert not os.path.exists(args.output_dir)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(word_model, tmp_path, monkeypatch):
    import jax.numpy as jnp

    import ettin_jax.train.steps as steps

    real = steps.train_step

    def poisoned(state, batch, rng):
        state, metrics = real(state, batch, rng)
        bad = int(state.step) == 3
        return state, {**metrics, "loss": jnp.where(bad, jnp.nan, metrics["loss"])}

    monkeypatch.setattr(steps, "train_step", poisoned)
    args = _args(word_model, tmp_path, max_steps=6, save_steps=2, eval_file=None)
    with pytest.raises(TrainingError, match=r"loss is nan at step 3.*last good checkpoint is step 2"):
        train(args)
    assert os.listdir(os.path.join(args.output_dir, "checkpoints")) == ["2"]


def test_bad_data_is_named(word_model, tmp_path, caplog):
    with pytest.raises(
        DataError, match=r"column 'sentence' is not in .*train\.csv; its columns are \['label', 'text'\]"
    ):
        prepare(_args(word_model, tmp_path, text_column="sentence"))
    rows = xor_rows(4, seed=2)
    rows[2]["label"] = "unsure"
    eval_file = write_rows(tmp_path / "bad_eval.csv", rows)
    with pytest.raises(
        DataError, match=r"label 'unsure' in row 3 of .*bad_eval\.csv .* not in the label set \['diff', 'same'\]"
    ):
        prepare(_args(word_model, tmp_path, eval_file=eval_file))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        prepare(_args(word_model, tmp_path, train_file=str(tmp_path / "empty.jsonl")))
    with caplog.at_level(logging.WARNING, logger="ettin_jax.train"):
        prepared = prepare(_args(word_model, tmp_path, max_length=6))
        prepared.train.ids[0]  # texts are tokenized, and truncated, as batches need them
    assert prepared.train.ids.truncated > 0
    assert "train texts longer than --max-length 6 tokens are truncated" in caplog.text


def test_argument_errors():
    with pytest.raises(TrainingError, match="exactly one of --epochs and --max-steps"):
        TrainArgs(task="classify", model="m", train_file="f", output_dir="o")
    with pytest.raises(TrainingError, match="--batch-size must be >= 1"):
        TrainArgs(task="lm", model="m", train_file="f", output_dir="o", max_steps=1, batch_size=0)
    with pytest.raises(TrainingError, match="contradict"):
        TrainArgs(task="lm", model="m", train_file="f", output_dir="o", max_steps=1, resume=True, overwrite=True)
    with pytest.raises(TrainingError, match="--problem-type must be one of regression, single_label"):
        TrainArgs(task="classify", train_file="f", output_dir="o", max_steps=1, problem_type="multi")
    with pytest.raises(TrainingError, match="--metric-for-best: unknown metric 'eval_speed'"):
        TrainArgs(task="classify", train_file="f", output_dir="o", max_steps=1, metric_for_best="eval_speed")
    assert TrainArgs(task="lm", train_file="f", output_dir="o", epochs=1, max_grad_norm=0).max_grad_norm is None


def test_train_args_describe_the_command_line():
    """The train subcommands generate their flags from TrainArgs: each field has a help text,
    and its metadata says what argparse cannot read from the annotation."""
    import dataclasses

    from ettin_jax.config import PROBLEM_TYPES

    fields = {f.name: f for f in dataclasses.fields(TrainArgs)}
    assert all(f.metadata["help"] for f in fields.values())
    required = {n for n, f in fields.items() if f.default is dataclasses.MISSING}
    assert required == {"task", "output_dir"}  # and one of --train-file and --dataset
    assert {n for n, f in fields.items() if f.metadata.get("cli") is False} == {"task", "mesh"}
    assert {n for n, f in fields.items() if f.metadata.get("group") == "length"} == {"epochs", "max_steps"}
    assert fields["problem_type"].metadata["choices"] == PROBLEM_TYPES
    assert fields["progress"].metadata["flag"] == "--no-progress"
    assert fields["block_size"].metadata["tasks"] == ("lm",)
    assert fields["label_column"].metadata["tasks"] == ("classify",)


def _cli(*argv: str) -> int:
    from ettin_jax.cli import main

    return main(list(argv))


def test_cli_multi_label_regression_and_lm(word_model, tmp_path, capsys):
    rows = xor_rows(64, seed=3)
    multi = [{"text": r["text"], "tags": sorted({r["text"].split()[0], r["label"]})} for r in rows]
    files = {
        "multi": write_rows(tmp_path / "multi.jsonl", multi),
        "reg": write_rows(tmp_path / "reg.parquet", [{"text": r["text"], "y": len(r["text"]) / 10} for r in rows]),
        "lm": write_rows(tmp_path / "lm.csv", [{"text": r["text"]} for r in rows]),
    }
    common = ["--model", word_model, "--max-steps", "4", "--batch-size", "8", "--save-steps", "2", "--no-progress"]
    for name, extra, metric in (
        ("multi", ["classify", "--label-column", "tags", "--max-length", "16"], "eval_exact_match"),
        ("reg", ["classify", "--label-column", "y", "--max-length", "16"], "eval_pearson"),
        ("lm", ["lm", "--block-size", "16"], "eval_perplexity"),
    ):
        out = str(tmp_path / f"out-{name}")
        argv = ["train", *extra, "--train-file", files[name], "--eval-file", files[name], "--output-dir", out]
        assert _cli(*argv, *common) == 0
        record = run_records(out)[-1]
        assert record["step"] == 4 and np.isfinite(record[metric]), record
        with open(os.path.join(out, "final", "config.json")) as f:
            config = json.load(f)
        if name == "multi":
            assert config["problem_type"] == "multi_label_classification"
            assert "eval_f1_same" in record and len(config["id2label"]) == 2 + 6  # same/diff + the first words
        if name == "reg":
            assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
        if name == "lm":
            assert config["architectures"] == ["ModernBertDecoderForCausalLM"]
            assert record["eval_perplexity"] == pytest.approx(np.exp(record["eval_loss"]), rel=1e-6)
    assert "finished at step 4 of 4" in capsys.readouterr().out
    # A second run into the same directory is refused with a one-line error.
    assert _cli(*argv, *common) == 2
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err


def test_sigterm_from_outside_saves_and_exits_143(word_model, tmp_path):
    """The command line under a real SIGTERM, as a pod's preemption sends it."""
    train_file = write_rows(tmp_path / "train.csv", xor_rows(64, seed=0))
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "ettin_jax.cli", "train", "classify", "--model", word_model, "--train-file", train_file,
        "--output-dir", str(out), "--max-steps", "1000000", "--batch-size", "8", "--max-length", "16",
        "--log-steps", "1", "--save-steps", "1000000", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no training step within 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED_EXIT, stderr
    steps = os.listdir(out / "checkpoints")
    assert len(steps) == 1 and int(steps[0]) >= 1
    assert f"saved a checkpoint at step {steps[0]}" in stderr and "--resume" in stderr
    assert f"preempted at step {steps[0]}" in stdout
