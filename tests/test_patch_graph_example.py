"""examples/patch_graph.py runs end to end for a few steps on the real MNIST test split."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPT = REPO / "examples" / "patch_graph.py"


@pytest.mark.parametrize("attention", ["gat", "na"])
def test_patch_graph_runs_and_saves_picture(shared_datasets, tmp_path, attention):
    """gat: without --plot the picture goes to runs/patch_graph/ in the repository, never the working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    steps = "70" if attention == "gat" else "30"
    cmd = [
        sys.executable, str(SCRIPT), "--holdout", "--data-dir", str(shared_datasets),
        "--attention", attention, "--epochs", "1", "--max-steps", steps, "--batch-size", "32",
    ]
    if attention == "gat":
        cmd += ["--knn", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training on 8,000 of its images, testing on the other 2,000" in r.stdout
    assert not list(cwd.iterdir()), f"files written into the working directory: {list(cwd.iterdir())}"
    acc = float(r.stdout.split("test accuracy ")[-1].split("%")[0])
    if attention == "gat":
        plot = REPO / "runs" / "patch_graph" / r.stdout.split("saved attention picture to ")[1].split()[0].rsplit("/", 1)[-1]
        try:
            assert f"saved attention picture to {plot}" in r.stdout, r.stdout
            assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        finally:
            plot.unlink(missing_ok=True)
        # 250 steps per epoch: a plain progress line (with an ETA) every quarter epoch
        assert "  epoch   1 step 62/70 | loss" in r.stdout and "elapsed, ETA" in r.stdout, r.stdout
        assert acc > 25.0, f"after 70 steps the model should beat chance (10%) clearly, got {acc}%\n{r.stdout}"
    else:
        assert "no attention picture" in r.stdout
        assert acc > 15.0, f"the NA model should be learning after 30 steps, got {acc}%\n{r.stdout}"


def test_expected_errors_are_one_line(tmp_path):
    """Missing data offline and invalid options: a message on stderr, non-zero exit, no traceback."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()  # an empty local mirror: the download fails without touching the network
    r = subprocess.run([sys.executable, str(SCRIPT), "--holdout", "--data-dir", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, GATX_DATA_MIRROR=mirror.as_uri()))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "\nerror: 2 data file(s) missing under" in "\n" + r.stderr and "t10k-images-idx3-ubyte.gz" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, str(SCRIPT), "--heads", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1].endswith("--heads must divide --dim, got dim 64 and 3 heads"), r.stderr
