"""Run ``bench_gat.py`` and ``bench_vision.py`` and write JSON rows, a markdown table and PNG plots.

    python benchmarks/run.py --quick                    # CPU, about 2-3 minutes on 2 cores
    python benchmarks/run.py                            # full sizes (CPU: tens of minutes)
    python benchmarks/run.py --device cuda --out-dir benchmarks/results/cuda
    python benchmarks/run.py --tiny --out-dir /tmp/b    # seconds: keeps the scripts working (tests)

Writes ``<out-dir>/results.json`` ({env, command, rows}), ``results.md``, ``gat.png`` and
``vision.png``. Each benchmark runs in its own process (see ``_harness.py`` for how peak memory is
measured). Timings are wall-clock medians: on a machine shared with other jobs they are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import write_markdown, write_plots  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CPU in under 3 minutes on 2 cores")
    size.add_argument("--tiny", action="store_true", help="seconds: tiny sizes, for tests")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out-dir", default=str(HERE / "results"), help="where results.json/.md and the plots go")
    p.add_argument("--data-dir", default=None, help="dataset root for Cora (default: the loader's default)")
    p.add_argument("--only", choices=("gat", "vision"), default=None, help="run one benchmark")
    p.add_argument("--gat-args", default="", help="extra arguments for bench_gat.py, e.g. '--sizes 1000,10000'")
    p.add_argument("--vision-args", default="", help="extra arguments for bench_vision.py, e.g. '--kernels 7'")
    return p.parse_args(argv)


def run_bench(script: str, args: argparse.Namespace, extra: list[str], out: Path) -> tuple[dict[str, Any] | None, str]:
    cmd = [sys.executable, str(HERE / script), "--device", args.device, "--json", str(out)] + extra
    if args.quick:
        cmd.append("--quick")
    if args.tiny:
        cmd.append("--tiny")
    print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=HERE.parent)
    took = time.perf_counter() - t0
    print(f"{script}: {took:.0f} s, exit status {proc.returncode}", file=sys.stderr, flush=True)
    if proc.returncode != 0 or not out.exists():
        return None, f"{script} exited with status {proc.returncode}"
    return json.loads(out.read_text()), ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    benches = [("gat", "bench_gat.py", args.gat_args), ("vision", "bench_vision.py", args.vision_args)]
    for name, script, extra in benches:
        if args.only not in (None, name):
            continue
        extra_args = extra.split()
        if name == "gat" and args.data_dir:
            extra_args += ["--data-dir", args.data_dir]
        result, err = run_bench(script, args, extra_args, out_dir / f"{name}.json.tmp")
        if result is None:
            errors.append(err)
            continue
        env = env or result["env"]
        rows += result["rows"]
        (out_dir / f"{name}.json.tmp").unlink()
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    command = " ".join(
        ([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if os.environ.get("OMP_NUM_THREADS") else [])
        + ["python benchmarks/run.py"] + ([f"--{mode}"] if mode != "full" else [])
        + ([f"--device {args.device}"] if args.device != "cpu" else [])
        + ([f"--gat-args '{args.gat_args}'"] if args.gat_args else [])
        + ([f"--vision-args '{args.vision_args}'"] if args.vision_args else []))
    from _harness import load_average

    env["load_avg_1min_end"] = load_average()
    payload = {"env": env, "mode": mode, "command": command, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1))
    if rows:
        write_markdown(payload, out_dir / "results.md")
        write_plots(payload, out_dir)
    print(f"wrote {out_dir}/results.json, results.md, gat.png, vision.png in {payload['seconds']} s", file=sys.stderr)
    for err in errors:
        print("error: " + err, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
