"""Two processes on 127.0.0.1, 4 CPU devices each, gloo collectives: the `ettin-jax` command
line as a pod runs it, against one process with the same 8-device mesh."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import torch_model
from textdata import FILLER, FIRST, LAST, word_tokenizer, write_rows, xor_rows

from ettin_jax.train import TrainArgs, train

TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def launch(*per_process: list[str], cwd: str) -> list[subprocess.CompletedProcess]:
    """Runs `ettin-jax ARGS` in len(per_process) processes joined through a local coordinator."""
    port = _free_port()
    n = len(per_process)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ettin_jax.cli",
                *args,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(n),
                "--process-id",
                str(i),
                "--distributed-timeout",
                "60",
            ],
            cwd=cwd,
            env=_env(8 // n),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, args in enumerate(per_process)
    ]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def single(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ettin_jax.cli", *args], cwd=cwd, env=_env(8), capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip


def _ok(results: list[subprocess.CompletedProcess]) -> None:
    for i, r in enumerate(results):
        assert r.returncode == 0, f"process {i} exited {r.returncode}:\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A word-level tiny causal LM, a second one with other weights, prompts and data files."""
    root = tmp_path_factory.mktemp("multihost")
    for name, seed in (("model", 3), ("other", 4)):
        # Two layers (one global, one sliding): every process compiles each program, so size is time.
        torch_model("causal", seed=seed, num_hidden_layers=2).save_pretrained(root / name)
        word_tokenizer().save_pretrained(root / name)
    rng = np.random.default_rng(0)
    words = FIRST + LAST + FILLER
    prompts = [" ".join(rng.choice(words, size=rng.integers(1, 9))) for _ in range(11)]
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    write_rows(root / "train.csv", xor_rows(64, seed=0))
    write_rows(root / "eval.csv", xor_rows(32, seed=1))
    return root


def test_batch_generation_across_two_processes_equals_one_process(workdir):
    common = [
        "generate",
        "--model",
        "model",
        "--input-file",
        "prompts.txt",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "8",
    ]
    # fsdp x tensor spans both processes: each holds half of every sharded param.
    multi = launch(
        [*common, "--output-file", "multi.jsonl", "--mesh", "fsdp=4,tensor=2"],
        [*common, "--output-file", "multi.jsonl", "--mesh", "fsdp=4,tensor=2"],
        cwd=workdir,
    )
    _ok(multi)
    # Without a mesh, each process serves every other prompt on a whole model of its own, into a
    # part file; process 0 merges the parts.
    shared = launch(*[[*common, "--output-file", "shared.jsonl"]] * 2, cwd=workdir)
    _ok(shared)
    reference = single([*common, "--output-file", "single.jsonl"], cwd=workdir)
    assert reference.returncode == 0, reference.stderr[-3000:]
    merged = (workdir / "multi.jsonl").read_text()
    assert merged == (workdir / "single.jsonl").read_text() == (workdir / "shared.jsonl").read_text()
    assert len(merged.splitlines()) == 11
    assert not list(workdir.glob("shared.jsonl.part-*"))
    assert "process 0: 6 prompts" in shared[0].stderr and "process 1: 5 prompts" in shared[1].stderr
    # Only process 0 writes and reports.
    for results in (multi, shared):
        assert "wrote 11 results" in results[0].stderr and "wrote" not in results[1].stderr
    # No host read the whole model: each read about half of the checkpoint.
    for i, r in enumerate(multi):
        read, total = map(int, re.search(r"read (\d+) of the checkpoint's (\d+) bytes", r.stderr).groups())
        assert read < 0.6 * total, f"process {i} read {read} of {total} bytes"


def _train_args(workdir, out: str, **changes) -> list[str]:
    args = dict(
        model="model", train_file="train.csv", eval_file="eval.csv", output_dir=out, max_steps=4, batch_size=8,
        learning_rate=3e-3, save_steps=2, max_length=16, mesh="fsdp=4,tensor=2",
    )  # fmt: skip
    args.update(changes)
    flags = ["train", "classify", "--no-progress"]
    for k, v in args.items():
        if v is True:
            flags.append(f"--{k.replace('_', '-')}")
        elif v is not None:
            flags += [f"--{k.replace('_', '-')}", str(v)]
    return flags


def _final(directory) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(os.path.join(directory, "final", "model.safetensors"))


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, rtol=1e-5, err_msg=name)


def _crash_after_step_2(directory) -> None:
    """What a run killed between its checkpoints at steps 2 and 4 leaves behind."""
    for name in ("final", "best", os.path.join("checkpoints", "4")):
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def test_training_across_processes_and_resuming_across_topologies(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    # One process, the same 8-device mesh (conftest gives this process 8 CPU devices).
    train(TrainArgs(task="classify", model="model", train_file="train.csv", eval_file="eval.csv",
                    output_dir="one", max_steps=4, batch_size=8, learning_rate=3e-3, save_steps=2,
                    max_length=16, mesh="fsdp=4,tensor=2", progress=False))  # fmt: skip
    reference = _final(workdir / "one")

    two = launch(_train_args(workdir, "two"), _train_args(workdir, "two"), cwd=workdir)
    _ok(two)
    _assert_close(_final(workdir / "two"), reference)
    records = [json.loads(line) for line in (workdir / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]

    # Saved by two processes, resumed by one (on another mesh shape, even).
    shutil.copytree(workdir / "two", workdir / "two-then-one")
    _crash_after_step_2(workdir / "two-then-one")
    train(TrainArgs(task="classify", model="model", train_file="train.csv", eval_file="eval.csv",
                    output_dir="two-then-one", max_steps=4, batch_size=8, learning_rate=3e-3, save_steps=2,
                    max_length=16, mesh="data=8", progress=False, resume=True))  # fmt: skip
    _assert_close(_final(workdir / "two-then-one"), reference)

    # Saved by one process, resumed by two.
    shutil.copytree(workdir / "one", workdir / "one-then-two")
    _crash_after_step_2(workdir / "one-then-two")
    resumed = launch(
        _train_args(workdir, "one-then-two", resume=True),
        _train_args(workdir, "one-then-two", resume=True),
        cwd=workdir,
    )
    _ok(resumed)
    assert "resumed from step 2" in resumed[0].stderr
    _assert_close(_final(workdir / "one-then-two"), reference)


def test_packed_lora_training_across_processes(workdir, monkeypatch):
    """Two processes train LoRA on packed rows to the merged model and the adapter of one
    process on the same mesh; the adapter's params are gathered from both to be written."""
    from safetensors.numpy import load_file

    monkeypatch.chdir(workdir)
    changes = dict(lora_rank=4, pack=True, max_length=32)
    train(TrainArgs(task="classify", model="model", train_file="train.csv", eval_file="eval.csv",
                    output_dir="lora-one", max_steps=4, batch_size=8, learning_rate=3e-3, save_steps=2,
                    mesh="fsdp=4,tensor=2", progress=False, **changes))  # fmt: skip
    _ok(launch(_train_args(workdir, "lora-two", **changes), _train_args(workdir, "lora-two", **changes), cwd=workdir))
    _assert_close(_final(workdir / "lora-two"), _final(workdir / "lora-one"))
    adapters = [
        load_file(workdir / run / "final" / "adapter" / "adapter_model.safetensors") for run in ("lora-one", "lora-two")
    ]
    assert any("lora_B" in name for name in adapters[0])
    _assert_close(*adapters)


@pytest.mark.parametrize(("other", "what"), [("other", "checkpoint"), ("other-config", "config")])
def test_processes_that_disagree_stop_with_a_message(workdir, other, what):
    if other == "other-config" and not (workdir / other).exists():
        shutil.copytree(workdir / "model", workdir / other)  # the same weights, another window
        config = json.loads((workdir / other / "config.json").read_text())
        config["local_attention"] = 2 * config["local_attention"]
        (workdir / other / "config.json").write_text(json.dumps(config))
    common = ["generate", "--max-new-tokens", "2", "--mesh", "data=8", "w1 w2"]
    results = launch([*common, "--model", "model"], [*common, "--model", other], cwd=workdir)
    for r in results:
        assert r.returncode == 2
        assert f"the processes disagree on the {what}: process(es) 1 differ from process 0" in r.stderr


def test_an_unreachable_coordinator_is_an_error_not_a_hang(workdir):
    port = _free_port()  # nothing listens there
    r = subprocess.run(
        [sys.executable, "-m", "ettin_jax.cli", "generate", "--model", "model", "w1", "--coordinator",
         f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1", "--distributed-timeout", "3"],
        cwd=workdir, env=_env(4), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2
    assert f"process 1 could not reach the coordinator 127.0.0.1:{port} within 3 s" in r.stderr


def test_a_mesh_larger_than_the_devices_is_an_error(workdir):
    r = single(["generate", "--model", "model", "--mesh", "data=4,tensor=4", "w1"], cwd=workdir)
    assert r.returncode == 2
    assert "error: --mesh data=4,tensor=4: mesh data=4,fsdp=1,tensor=4 needs 16 devices but there are 8" in r.stderr


def test_distributed_without_a_cluster_says_what_to_give(workdir):
    r = single(["generate", "--model", "model", "--distributed", "--distributed-timeout", "3", "w1"], cwd=workdir)
    assert r.returncode == 2
    assert "--distributed found no cluster to join" in r.stderr and "give --coordinator HOST:PORT" in r.stderr
