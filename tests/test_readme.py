"""README.md cannot rot: every ```python block runs as written, and every command shows its run time.

Each python block runs on its own, in a fresh interpreter (so it must define everything it uses),
in README order, with a timeout. Blocks that use DGL are skipped, with the reason, only where DGL
cannot be imported. New blocks are picked up automatically.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, dgl_or_none

README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
TIMEOUT_S = 300  # per block; the README's blocks take seconds on a quiet machine
# a duration in a comment: "~3 min", "5 s", "< 3 min", "~1 h", "35 s"
DURATION = re.compile(r"#.*\b\d+(\.\d+)?\s*(s|sec|min|h)\b")


def blocks(language: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block in that language, in README order."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


PYTHON = blocks("python")


def needs_dgl(code: str) -> bool:
    return bool(re.search(r"\bimport_dgl\b|\bimport dgl\b|\bdgl\.", code))


def test_readme_has_python_blocks():
    assert len(PYTHON) >= 3, f"found {len(PYTHON)} ```python blocks in README.md; did the fence syntax change?"


@pytest.mark.parametrize("line, code", PYTHON, ids=[f"README.md:{line}" for line, _ in PYTHON])
def test_python_block_runs(line, code, tmp_path):
    if needs_dgl(code) and dgl_or_none() is None:
        pytest.skip(f"README.md:{line} uses DGL, which cannot be imported here")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=TIMEOUT_S, env=env)
    numbered = "\n".join(f"{i:3d}  {c}" for i, c in enumerate(code.splitlines(), 1))
    assert r.returncode == 0, f"README.md:{line}: the block fails as written:\n{numbered}\n{r.stderr[-3000:]}"
    assert not list(tmp_path.iterdir()), f"README.md:{line} wrote files into the working directory"


def test_every_command_states_its_run_time():
    """Every command in a ```bash block has a comment with its expected duration (the line's, or the
    comment on a continuation line of the same command)."""
    missing = []
    for line, code in blocks("bash"):
        command = ""
        for i, text in enumerate(code.splitlines()):
            command += text + "\n"
            if text.rstrip().endswith("\\"):
                continue
            if command.strip() and not command.lstrip().startswith("#") and not DURATION.search(command):
                missing.append(f"README.md:{line + 1 + i}: {command.strip()}")
            command = ""
    assert not missing, "commands without an expected run time:\n" + "\n".join(missing)


def test_no_blocks_left_without_a_language():
    """Indented or bare fences would escape the two checks above."""
    bare = [line for line, _ in blocks("")]
    assert not bare, f"fenced blocks without a language at README.md lines {bare}: mark them python or bash"
