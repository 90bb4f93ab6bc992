"""The benchmark scripts keep working: ``benchmarks/run.py --tiny`` end to end, and the output check.

Timing is never asserted; values are: every system that ran agreed with gatx before it was timed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_datasets) -> Path:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: no spin-waiting on a machine busy with other tests
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--tiny", "--out-dir", str(out), "--data-dir", str(shared_datasets)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, f"run.py --tiny failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return out


def test_outputs_written(tiny_run: Path) -> None:
    for name in ("results.json", "results.md", "gat.png", "vision.png"):
        assert (tiny_run / name).stat().st_size > 0, f"{name} is empty"
    for png in ("gat.png", "vision.png"):
        assert (tiny_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
    md = (tiny_run / "results.md").read_text()
    assert "| graph | N | E |" in md and "gatx[torch]" in md and "pyg.GATConv" in md
    assert not list(tiny_run.glob("*.tmp")), "temporary per-benchmark files were left behind"


def test_every_timed_system_matched_gatx(tiny_run: Path) -> None:
    data = json.loads((tiny_run / "results.json").read_text())
    env, rows = data["env"], data["rows"]
    assert env["torch"] == torch.__version__ and env["threads"] >= 1 and env["device"] == "cpu"
    assert {r["status"] for r in rows} <= {"ok", "skipped"}, [r for r in rows if r["status"] not in ("ok", "skipped")]
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        assert r["max_rel_diff"] <= 1e-3, f"{r['system']} on {r['case']}: relative difference {r['max_rel_diff']:.2e}"
        assert r["median_ms"] > 0 and r["reps"] >= 1 and r["peak_mem_mib"] >= 0
        assert r["mode"] in ("fwd", "fwd+bwd")
    gat_cases = {r["case"] for r in rows if r["bench"] == "gat" and r["system"] != "*"}
    assert {"random-64", "random-256"} <= gat_cases
    for case in gat_cases:
        timed = {r["system"] for r in ok if r["case"] == case}
        # the reference and the independent baselines (PyG always, dense on small graphs) really ran
        assert {"gatx[torch]", "pyg.GATConv"} <= timed, f"{case}: only {sorted(timed)} ran"
    assert any(r["system"] == "dense-masked" for r in ok), "the dense masked GAT never ran"
    vision_timed = {r["system"] for r in ok if r["bench"] == "vision"}
    assert {"dense-sdpa-mask", "gather-kxk", "swin-window-partition"} <= vision_timed, sorted(vision_timed)
    assert any(s.startswith("gatx.NA[") for s in vision_timed) and any(s.startswith("gatx.WA[") for s in vision_timed)


def test_wrong_system_is_not_timed() -> None:
    """A system whose output disagrees with the reference gets a 'mismatch' row and no timing."""
    sys.path.insert(0, str(BENCH))
    try:
        from _harness import check_and_time
    finally:
        sys.path.remove(str(BENCH))

    class Args:
        device, warmup, reps, budget, tol = "cpu", 0, 1, 0.1, 1e-3

    w = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 4)
    gout = torch.randn(5, 3)
    ref_out = x @ w
    ref_out.backward(gout)
    ref = {"out": ref_out.detach(), "w": w.grad.clone()}
    row = {"system": "s", "reference": "r"}

    rows = check_and_time(row, lambda: ((lambda: x @ w), {"w": w}), ref, gout, Args)
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[0]["max_abs_diff"] < 1e-6

    rows = check_and_time(row, lambda: ((lambda: x @ w * 1.01), {"w": w}), ref, gout, Args)
    assert [r["status"] for r in rows] == ["mismatch", "mismatch"] and "median_ms" not in rows[0]
    assert rows[0]["max_rel_diff"] > 5e-3
