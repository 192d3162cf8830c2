"""The README's examples run as printed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    section = text.split("<!-- readme-test:begin -->")[1].split("<!-- readme-test:end -->")[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)


def run_block(lang: str, code: str, cwd: Path, env: dict[str, str]) -> None:
    command = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False, env=env)
    assert result.returncode == 0, f"{lang} block failed:\n{code}\n{result.stderr[-3000:]}"
    for line in code.splitlines():
        # A printed line's comment states what it prints: check it.
        match = re.match(r"print\(.*\)\s+# (.*)$", line)
        if match:
            assert match.group(1) in result.stdout, f"expected {match.group(1)!r} in {result.stdout!r}"


def test_readme_examples_run_as_printed(tmp_path):
    found = blocks()
    assert [lang for lang, _ in found] == [
        "bash", "python", "python", "python", "python", "python", "python", "bash", "python", "bash", "bash", "python",
        "bash", "bash", "bash",
    ]  # fmt: skip
    env = {**os.environ, "ETTIN_JAX_HOME": str(tmp_path / "home")}  # nothing in the real home
    # The first block makes tiny-ettin and builds the default model. The rest only read those and
    # form two chains that share no file, run side by side, each in the README's order: one has
    # tiny-ettin's examples, the server's and the mesh example; the other the pipelines, the
    # fine-tuning and the evaluation.
    run_block(*found[0], tmp_path, env)

    def run_chain(indices: tuple[int, ...]) -> None:
        for i in indices:
            run_block(*found[i], tmp_path, env)

    try:
        with ThreadPoolExecutor(2) as pool:
            chains = (1, 2, 3, 4, 6, 7, 8, 9, 14), (5, 10, 11, 12, 13)
            for done in [pool.submit(run_chain, chain) for chain in chains]:
                done.result()  # re-raises a chain's failure
    finally:  # a failed block must not leave the README's server running
        pid = tmp_path / "serve.pid"
        if pid.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid.read_text()), signal.SIGKILL)
    assert (tmp_path / "tiny-classifier" / "model.safetensors").exists()
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()
    assert (tmp_path / "lora-run" / "final" / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "results.json").read_text())["results"]["reversed"]["acc,none"] == 1.0


def test_readme_set_up_commands():
    text = README.read_text()
    set_up = text.split("## Set up")[1].split("```bash\n")[1].split("```")[0]
    commands = [line.split("  #")[0].strip() for line in set_up.splitlines()]
    assert commands[0] == 'pip install torch==2.13.0 && pip install -e ".[train,test]"'
    assert commands[1].startswith("ettin-jax generate ")
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[2] in ci  # CI runs the README's test command
