"""``python -m gatx.info``: every backend gets a line that says what it runs here, never a crash."""
from __future__ import annotations

import subprocess
import sys

from gatx import info
from gatx.ops import BACKENDS


def test_every_backend_listed_with_its_purpose():
    text = info.report()
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert set(BACKENDS) <= set(lines), f"backends missing from gatx.info: {set(BACKENDS) - set(lines)}\n{text}"
    assert lines["torch"].split()[2] == "usable", lines["torch"]
    # structured runs grid graphs only: said as what it is for, not as "unusable"
    assert "usable for grid graphs from gatx.vision" in lines["structured"] and "unusable" not in lines["structured"]
    assert "triton" in text  # the library version line, and the backend's line where it is a backend


def test_broken_backend_is_reported_not_fatal(monkeypatch):
    def broken(name):
        raise ImportError(f"cannot import gatx.backends.{name}")

    monkeypatch.setattr(info, "backend_module", broken)
    status = info.backend_status("fused", "cpu")
    assert status.startswith("unusable: could not be checked: ImportError: cannot import gatx.backends.fused"), status


def test_cli_states_dgl_workaround_as_a_fact():
    r = subprocess.run([sys.executable, "-m", "gatx.info"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "backends (" in r.stdout, r.stderr
    assert "Warning" not in r.stderr, f"gatx.info should state facts, not warn:\n{r.stderr}"
