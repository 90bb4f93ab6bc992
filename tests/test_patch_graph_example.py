"""examples/patch_graph.py runs end to end for a few steps on the real MNIST test split."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize("attention", ["gat", "na"])
def test_patch_graph_runs_and_saves_picture(shared_datasets, tmp_path, attention):
    plot = tmp_path / "attention.png"
    steps = "60" if attention == "gat" else "30"
    cmd = [
        sys.executable, str(REPO / "examples" / "patch_graph.py"), "--holdout", "--data-dir", str(shared_datasets),
        "--attention", attention, "--epochs", "1", "--max-steps", steps, "--batch-size", "32", "--plot", str(plot),
    ]
    if attention == "gat":
        cmd += ["--knn", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training on 8,000 of its images, testing on the other 2,000" in r.stdout
    acc = float(r.stdout.split("test accuracy ")[-1].split("%")[0])
    if attention == "gat":
        assert f"saved attention picture to {plot}" in r.stdout
        assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert acc > 25.0, f"after 60 steps the model should beat chance (10%) clearly, got {acc}%\n{r.stdout}"
    else:
        assert "no attention picture" in r.stdout and not plot.exists()
        assert acc > 15.0, f"the NA model should be learning after 30 steps, got {acc}%\n{r.stdout}"
