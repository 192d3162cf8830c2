"""The README's examples run as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    section = text.split("<!-- readme-test:begin -->")[1].split("<!-- readme-test:end -->")[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)


def test_readme_examples_run_as_printed(tmp_path):
    found = blocks()
    assert [lang for lang, _ in found] == ["bash", "python", "python"]
    for lang, code in found:
        command = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{lang} block failed:\n{code}\n{result.stderr[-3000:]}"
        for line in code.splitlines():
            # A printed line's comment states what it prints: check it.
            match = re.match(r"print\(.*\)\s+# (.*)$", line)
            if match:
                assert match.group(1) in result.stdout, f"expected {match.group(1)!r} in {result.stdout!r}"
    assert (tmp_path / "tiny-classifier" / "model.safetensors").exists()
