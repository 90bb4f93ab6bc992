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

from conftest import REQUIRE_ENV, missing_test_data, shared_datasets_dir

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


@pytest.fixture(scope="module")
def bench_modules():
    """run.py, report.py, _harness.py and bench_vision.py imported from benchmarks/ (they are scripts)."""
    sys.path.insert(0, str(BENCH))
    try:
        import _harness
        import bench_vision
        import report
        import run

        yield run, report, _harness, bench_vision
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, str]:
    """``run.py --tiny`` into a temporary folder: (that folder, the run's stderr). Cora is included when
    the real test data is there; the tiny run needs none otherwise (and never downloads)."""
    out = tmp_path_factory.mktemp("bench")
    data = shared_datasets_dir()
    why = missing_test_data(data)
    if why is not None and os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{why} ({REQUIRE_ENV} is set)", pytrace=False)
    extra = ["--data-dir", str(data)] if why is None else ["--gat-args=--no-cora"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: no spin-waiting on a machine busy with other tests
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--tiny", "--out-dir", str(out), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, f"run.py --tiny failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return out, proc.stderr


def test_outputs_written(tiny_run) -> None:
    tiny_run, stderr = tiny_run
    for name in ("results.json", "results.md", "gat.png", "vision.png"):
        assert (tiny_run / name).stat().st_size > 0, f"{name} is empty"
    for png in ("gat.png", "vision.png"):
        assert (tiny_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
    md = (tiny_run / "results.md").read_text()
    assert "| graph | N | E |" in md and "gatx[torch]" in md and "pyg.GATConv" in md
    assert not list(tiny_run.glob("*.tmp")), "temporary per-benchmark files were left behind"
    # progress without a terminal: one plain line per case, each with an ETA
    assert "[benchmark 2/3] bench_vision.py" in stderr and "[bench_vision map 2/2]" in stderr, stderr[-3000:]
    assert "[benchmark 3/3] bench_compile.py" in stderr and "[bench_compile case 2/2]" in stderr, stderr[-3000:]
    assert "[bench_gat case 2/" in stderr and "elapsed, ETA" in stderr
    assert f"to {tiny_run} in" in stderr


def test_every_timed_system_matched_gatx(tiny_run) -> None:
    data = json.loads((tiny_run[0] / "results.json").read_text())
    env, rows = data["env"], data["rows"]
    assert env["torch"] == torch.__version__ and env["threads"] >= 1 and env["device"] == "cpu"
    # a torch.compile that fails is a result of bench_compile ("failed", with the reason), never of the others
    allowed = lambda r: {"ok", "failed"} if r["bench"] == "compile" and r["system"] != "eager" else {"ok", "skipped"}  # noqa: E731
    assert all(r["status"] in allowed(r) for r in rows), [r for r in rows if r["status"] not in allowed(r)]
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


def test_peak_memory_phase_counts_a_buffer_allocated_and_freed_in_it() -> None:
    """glibc's allocator switches, and a memory phase counts a 64 MiB buffer made and freed inside it
    (after the same buffer was made and freed once before the phase).

    Run in a subprocess: the allocator settings are process-wide."""
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "from _harness import allocator, peak_memory\n"
        "assert allocator('reuse')\n"
        "def call():\n"
        "    torch.ones(16 * 2**20).sum()\n"  # 64 MiB, freed at once
        "call()\n"
        "mem = peak_memory(call, 'cpu')\n"
        "print(mem.method, mem.mib)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    method, mib = r.stdout.split()
    assert method == "VmHWM-VmRSS" and 60 <= float(mib) <= 80, r.stdout


def test_default_output_is_scratch(bench_modules) -> None:
    """By default results go to a fresh git-ignored folder; the committed results only when asked."""
    run = bench_modules[0]
    args = run.parse_args(["--quick"])
    out = Path(args.out_dir)
    assert out.parent == REPO / "runs" / "benchmarks" and out.name.startswith("quick-cpu-"), out
    assert Path(run.parse_args(["--update-results"]).out_dir) == BENCH / "results"
    with pytest.raises(SystemExit):
        run.parse_args(["--update-results", "--out-dir", "x"])
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "results.json")], cwd=REPO)
    assert ignored.returncode == 0, f"{out} is not git-ignored"


def busy_payload(tiny_dir: Path, load: float) -> dict:
    payload = json.loads((tiny_dir / "results.json").read_text())
    payload["env"].update(cpu_count=2, load_avg_1min=load, load_avg_1min_end=0.5)
    return payload


def test_busy_machine_is_flagged(tiny_run, bench_modules, tmp_path, monkeypatch) -> None:
    """Load average above the core count at the start or the end: a note in results.md and on every plot."""
    import matplotlib.figure

    _, report, _, _ = bench_modules
    assert report.busy_note({"cpu_count": 2, "load_avg_1min": 1.9, "load_avg_1min_end": 2.0}) is None
    assert "3.5 at the end" in report.busy_note({"cpu_count": 2, "load_avg_1min": 1.0, "load_avg_1min_end": 3.5})
    texts: dict[str, list[str]] = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        texts[Path(path).name] = [t.get_text() for t in fig.texts]
        return real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    for load, busy in ((5.0, True), (1.0, False)):
        payload = busy_payload(tiny_run[0], load)
        report.write_markdown(payload, tmp_path / "results.md")
        written = report.write_plots(payload, tmp_path)
        md = (tmp_path / "results.md").read_text()
        assert ("UNRELIABLE TIMINGS" in md) == busy and ("load average 5.0 at the start" in md) == busy, md[:600]
        assert sorted(written) == ["gat.png", "vision.png"] == sorted(texts)
        for name, fig_texts in texts.items():
            assert any("UNRELIABLE TIMINGS" in t for t in fig_texts) == busy, (name, fig_texts)
        texts.clear()


def test_help_shows_defaults(bench_modules, capsys) -> None:
    run, _, _, bench_vision = bench_modules
    for parse, expected in ((run.parse_args, ["(default: cpu)"]), (bench_vision.parse_args, ["(default: 2)", "(default: 0.001)"])):
        with pytest.raises(SystemExit):
            parse(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        for default in expected:
            assert default in text, text


def test_progress_eta_by_weight(bench_modules, capsys, monkeypatch) -> None:
    """Plain lines without a terminal; the ETA weighs items by their cost estimate."""
    _harness = bench_modules[2]
    clock = iter([0.0, 0.0, 10.0])  # start; item 1 at 0 s; item 2 after 10 s spent on weight 1
    monkeypatch.setattr(_harness.time, "perf_counter", lambda: next(clock))
    seen = list(_harness.progress(["a", "b"], [1.0, 3.0], "case", bar=False))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert seen == ["a", "b"] and "[case 1/2] 0:00 elapsed, ETA -" in err and "[case 2/2] 0:10 elapsed, ETA 0:30" in err, err


def test_compile_bench_rows(tiny_run) -> None:
    """bench_compile in the tiny run: per case an eager row and a compiled one (fullgraph, or the failure's
    reason plus a fullgraph=False row), compiled values equal to eager, and the report's section."""
    rows = [r for r in json.loads((tiny_run[0] / "results.json").read_text())["rows"] if r["bench"] == "compile"]
    cases = {r["case"] for r in rows}
    assert len(cases) == 2 and any(c.startswith("GATConv") for c in cases), cases
    for case in cases:
        got = {r["system"]: r for r in rows if r["case"] == case}
        assert got["eager"]["status"] == "ok", got["eager"]
        full = got["compile[fullgraph]"]
        if full["status"] == "ok":
            assert "compile[partial]" not in got and full["fullgraph"] is True
            compiled = full
        else:
            assert full["status"] == "failed" and full["reason"], full
            compiled = got["compile[partial]"]
        if compiled["status"] == "ok":
            assert compiled["compile_s"] > 0 and compiled["speedup_vs_eager"] > 0 and compiled["max_rel_diff"] <= 1e-3
    md = (tiny_run[0] / "results.md").read_text()
    assert "## torch.compile vs eager" in md and "fullgraph=False ms" in md


def test_compile_failure_is_recorded(bench_modules, monkeypatch) -> None:
    """A model that cannot compile with fullgraph=True gives a 'failed' row with the exception's first line,
    then a separate fullgraph=False row that ran and matched eager (no crash)."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_compile
    finally:
        sys.path.remove(str(BENCH))

    class Breaks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            if int(y.sum() > 0):  # data-dependent Python control flow: a graph break
                return y.relu()
            return y

    x = torch.randn(6, 4)
    monkeypatch.setattr(bench_compile, "build_case", lambda name, args: (Breaks(), lambda m: m(x), {"case": "breaks"}))
    args = bench_compile.parse_args(["--tiny", "--compiler", "eager"])
    rows = {r["system"]: r for r in bench_compile.run_case("gat", args)}
    assert rows["eager"]["status"] == "ok"
    assert rows["compile[fullgraph]"]["status"] == "failed", rows["compile[fullgraph]"]
    reason = rows["compile[fullgraph]"]["reason"]
    assert "\n" not in reason and len(reason) > 10, reason
    assert rows["compile[partial]"]["status"] == "ok" and rows["compile[partial]"]["max_rel_diff"] <= 1e-6
    md = "\n".join(bench_compile.markdown_section(list(rows.values())))
    assert "| breaks |" in md and "compile[fullgraph]: failed" in md


def test_block_bench_rows(tmp_path) -> None:
    """``bench_block.py --tiny``: every system agreed with the float64 reference before it was timed, gatx
    took the aggregate-first path there (its rule) and project-first when told, and ratios are to DGL."""
    out = tmp_path / "block.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_block.py"), "--tiny", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["system"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["gatx"]["path"] == "aggregate-first" and rows["gatx[project-first]"]["path"] == "project-first"
    for r in rows.values():
        if r["status"] == "ok":
            assert r["max_rel_diff"] <= 1e-3 and r["median_ms"] > 0 and len(r["times_ms"]) == 2
            assert r["src"] > r["dst"] == 500 and r["edges"] == 5000
    if rows["dgl.GATConv"]["status"] == "ok":
        assert rows["dgl.GATConv"]["ratio_to_dgl"] == pytest.approx(1.0)
        assert rows["gatx"]["ratio_to_dgl"] == pytest.approx(rows["gatx"]["median_ms"] / rows["dgl.GATConv"]["median_ms"])


@pytest.mark.parametrize("kind, busy_threads", [("gemm", 2), ("spin", 1), ("copy", 2)])
def test_contention_bench_rows(tmp_path, kind, busy_threads) -> None:
    """``bench_contention.py --tiny`` in two rounds: both systems agreed, were timed quiet (on all threads and
    on one) and beside a busy process of each kind, and the busy process is gone afterwards (slowdown =
    contended / quiet median, pooled over the rounds; each round's own slowdown is listed too; CPU time per call
    beside wall time)."""
    out = tmp_path / "contention.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH / "bench_contention.py"), "--tiny", "--rounds", "2", "--busy-threads",
                           str(busy_threads), "--busy-kind", kind, "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    if rows[0]["status"] == "skipped":
        pytest.skip(rows[0]["reason"])
    assert {r["system"] for r in rows} == {"gatx", "dgl"}
    for r in rows:
        assert r["max_rel_diff"] <= 1e-3
        assert r["slowdown"] == pytest.approx(r["contended_median_ms"] / r["quiet_median_ms"])
        assert r["speedup_1_to_n"] == pytest.approx(r["quiet_1thread_median_ms"] / r["quiet_median_ms"])
        assert r["contended_over_1thread"] == pytest.approx(r["contended_median_ms"] / r["quiet_1thread_median_ms"])
        # CPU time per call beside wall time: the cores the system got, and the work per call against alone
        assert r["quiet_1thread_cpu_ms"] > 0 and r["contended_cpu_ms"] > 0 and r["quiet_cpu_ms"] > 0
        assert r["cores_contended"] == pytest.approx(r["contended_cpu_ms"] / r["contended_median_ms"])
        assert r["cpu_over_1thread"] == pytest.approx(r["contended_cpu_ms"] / r["quiet_1thread_cpu_ms"])
        assert r["cpu_quiet_over_1thread"] == pytest.approx(r["quiet_cpu_ms"] / r["quiet_1thread_cpu_ms"])
        assert 0 < r["cores_contended"] <= os.cpu_count() + 0.5  # no more cores than the machine has (timer slack)
        assert r["cores_quiet"] == pytest.approx(r["quiet_cpu_ms"] / r["quiet_median_ms"])
        assert r["cpu_over_quiet"] == pytest.approx(r["contended_cpu_ms"] / r["quiet_cpu_ms"])
        # the exact split: cores kept busy alone x CPU per call against alone / cores got beside the neighbours
        assert r["slowdown"] == pytest.approx(r["cores_quiet"] * r["cpu_over_quiet"] / r["cores_contended"])
        assert r["busy_processes"] == 1 and r["busy_threads"] == busy_threads and r["busy_kind"] == kind
        assert r["quiet_median_ms"] > 0
        assert r["rounds"] == 2 and len(r["round_slowdowns"]) == 2 and len(r["contended_load_avg"]) == 2
        assert 0 <= r["rounds_no_worse"] <= 2
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"gatx bench_contention busy neighbour" in cmdline.read_bytes():
                left.append(cmdline.parent.name)
        except OSError:  # the process ended while we looked
            pass
    assert not left, f"busy processes left running: pids {left}"


def test_contention_bench_rejects_threaded_spin() -> None:
    """The integer-loop neighbour is an interpreter loop: one thread, so more threads are refused up front."""
    proc = subprocess.run([sys.executable, str(BENCH / "bench_contention.py"), "--tiny", "--busy-kind", "spin",
                           "--busy-threads", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--busy-kind spin runs one thread per process" in proc.stderr


def test_gatv2_bench_rows(tmp_path) -> None:
    """``bench_gatv2.py --tiny``: every system that ran agreed with gatx before it was timed, and the ratios
    are of the medians in the same run."""
    out = tmp_path / "gatv2.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_gatv2.py"), "--tiny", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["system"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"gatx", "gatx[torch]"} <= {name for name, r in rows.items() if r["status"] == "ok"}
    assert set(rows) == {"gatx", "gatx[torch]", "dgl.GATv2Conv", "pyg.GATv2Conv"}
    for name, r in rows.items():
        if r["status"] == "skipped":
            assert r["reason"]
            continue
        assert r["status"] == "ok" and r["max_rel_diff"] <= 1e-3 and r["median_ms"] > 0
        assert r["ratio_to_gatx"] == pytest.approx(r["median_ms"] / rows["gatx"]["median_ms"])
        if rows["dgl.GATv2Conv"]["status"] == "ok":
            assert r["ratio_to_dgl"] == pytest.approx(r["median_ms"] / rows["dgl.GATv2Conv"]["median_ms"])


def test_window_bench_rows(tmp_path) -> None:
    """``bench_window.py --tiny``: gatx's window module and Swin's formulation agreed (output and gradients) before
    they were timed, for each shift with flush-to-zero on and off, and the ratio is of the medians of one run."""
    out = tmp_path / "window.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH / "bench_window.py"), "--tiny", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["shift"], r["flush_denormal"]) for r in rows} == {(0, True), (0, False), (3, True), (3, False)}
    for r in rows:
        assert r["status"] == "ok" and r["max_rel_diff"] <= 1e-4 and r["median_ms"] > 0 and r["reps"] == 3
    for case in {r["case"] for r in rows}:
        pair = {r["system"]: r for r in rows if r["case"] == case}
        assert set(pair) == {"gatx.WindowAttention", "swin-window-partition"}
        assert pair["gatx.WindowAttention"]["ratio_to_swin"] == pytest.approx(
            pair["gatx.WindowAttention"]["median_ms"] / pair["swin-window-partition"]["median_ms"])


def test_window_bench_rejects_bad_shapes() -> None:
    """A map that is not whole windows, or a shift outside [0, window), is refused with the reason (exit 2)."""
    for extra, message in ((["--map", "15"], "not a whole number of 7x7 windows"),
                           (["--shifts", "7"], "every shift must be in [0, --window)")):
        proc = subprocess.run([sys.executable, str(BENCH / "bench_window.py"), *extra],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
