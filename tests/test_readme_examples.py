"""Every Python example in README.md runs as written, each in a fresh process in an empty
folder: the single-process ones with ``python``, the ``# torchrun ...`` ones with torchrun
(two gloo processes), and one that the README runs with a command (``In `train.py`:``,
then ``python train.py ...``) with that command. The CUDA example needs a GPU."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

README = Path(__file__).parents[1] / "README.md"
_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)
_NAMED = re.compile(r"In `(\w+\.py)`:\s*$")
_ON_CUDA = re.compile(r'device="cuda"|\.cuda\(\)')  # not a comment's "cuda" on GPUs


@dataclass
class Example:
    line: int  # of the opening fence in README.md
    code: str
    command: list[str]  # run in the example's folder, the file written as command's script
    script: str


def _command_after(blocks, index: int, script: str) -> list[str] | None:
    """The ``python script ...`` line (with its continuations) of the next shell block."""
    for language, text in blocks[index + 1 : index + 3]:
        if language == "bash" and text.startswith(f"python {script}"):
            return shlex.split(text.replace("\\\n", " "))
    return None


def readme_examples() -> list[Example]:
    text = README.read_text()
    matches = list(_BLOCK.finditer(text))
    blocks = [(m.group(1), m.group(2)) for m in matches]
    examples = []
    for index, match in enumerate(matches):
        language, code = blocks[index]
        if language != "python":
            continue
        line = text.count("\n", 0, match.start()) + 1
        first = code.splitlines()[0]
        before = text[: match.start()].rstrip().splitlines()[-1]
        if first.startswith("# torchrun"):
            command = first.lstrip("# ").split()
            script = command[-1]
        elif named := _NAMED.search(before):
            script = named.group(1)
            command = _command_after(blocks, index, script)
            assert command, f"README.md:{line}: {script} has no `python {script}` command"
        else:
            script, command = "example.py", ["python", "example.py"]
        examples.append(Example(line, code, command, script))
    return examples


EXAMPLES = readme_examples()


def test_the_readme_has_its_examples():
    assert len(EXAMPLES) >= 20  # a changed fence pattern would otherwise test nothing
    assert sum(e.command[0] == "torchrun" for e in EXAMPLES) == 3
    assert sum(bool(_ON_CUDA.search(e.code)) for e in EXAMPLES) == 1


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"README.md:{e.line}")
def test_example_runs_as_written(example: Example, tmp_path):
    if _ON_CUDA.search(example.code) and not torch.cuda.is_available():
        pytest.skip("a CUDA example")
    (tmp_path / example.script).write_text(example.code)
    command = list(example.command)
    if command[0] == "python":
        command[0] = sys.executable
    elif command[0] == "torchrun":  # the venv's own, as `python -m torch.distributed.run`
        command[:1] = [sys.executable, "-m", "torch.distributed.run"]
    environment = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, (
        f"README.md:{example.line} exited with {result.returncode}:\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
