"""Run ``bench_gat.py``, ``bench_vision.py`` and ``bench_compile.py``; write JSON rows, markdown tables and PNG plots.

    python benchmarks/run.py --quick                    # CPU, about 5 minutes on 2 cores (~2 of them in torch.compile)
    python benchmarks/run.py                            # full sizes (CPU: tens of minutes)
    python benchmarks/run.py --quick --update-results   # rewrite the committed benchmarks/results/
    python benchmarks/run.py --device cuda --out-dir /tmp/bench-cuda
    python benchmarks/run.py --tiny --out-dir /tmp/b    # seconds: keeps the scripts working (tests)
    python benchmarks/run.py --quick --only compile     # torch.compile vs eager only

Writes ``results.json`` ({env, command, rows}), ``results.md``, ``gat.png`` and ``vision.png`` into
``--out-dir``; by default a fresh folder ``runs/benchmarks/<mode>-<time>/`` in the repository
(git-ignored). The committed ``benchmarks/results/`` is written only with ``--update-results``.
Each benchmark runs in its own process (see ``_harness.py`` for how peak memory is measured) and
reports its progress per case, with an ETA. Timings are wall-clock medians: on a machine shared with
other jobs they are noisy, and when the 1-minute load average exceeds the core count at the start
or the end, ``results.md`` and the plots say so.
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

from _harness import HelpFormatter, load_average  # noqa: E402
from report import busy_note, write_markdown, write_plots  # noqa: E402

COMMITTED = HERE / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CPU in about 5 minutes on 2 cores")
    size.add_argument("--tiny", action="store_true", help="seconds: tiny sizes, for tests")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out-dir", default=None,
                       help="where results.json/.md and the plots go (default: runs/benchmarks/<mode>-<time>/)")
    where.add_argument("--update-results", action="store_true",
                       help=f"write into the committed {COMMITTED.relative_to(HERE.parent)}/ instead")
    p.add_argument("--data-dir", default=None, help="dataset root for Cora (default: the loader's default)")
    p.add_argument("--only", choices=("gat", "vision", "compile"), default=None, help="run one benchmark (default: all)")
    p.add_argument("--gat-args", default="", help="extra arguments for bench_gat.py, e.g. '--sizes 1000,10000'")
    p.add_argument("--vision-args", default="", help="extra arguments for bench_vision.py, e.g. '--kernels 7'")
    p.add_argument("--compile-args", default="", help="extra arguments for bench_compile.py, e.g. '--map 112'")
    args = p.parse_args(argv)
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device must be cpu, cuda or cuda:<index>, got {args.device!r}")
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    if args.update_results:
        args.out_dir = str(COMMITTED)
    elif args.out_dir is None:
        args.out_dir = str(HERE.parent / "runs" / "benchmarks" / f"{mode}-{args.device.replace(':', '')}-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def run_bench(script: str, args: argparse.Namespace, extra: list[str], out: Path) -> tuple[dict[str, Any] | None, str]:
    cmd = [sys.executable, str(HERE / script), "--device", args.device, "--json", str(out)] + extra
    if args.quick:
        cmd.append("--quick")
    if args.tiny:
        cmd.append("--tiny")
    print("$ python " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
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
    load_start = load_average()
    env: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    benches = [("gat", "bench_gat.py", args.gat_args), ("vision", "bench_vision.py", args.vision_args),
               ("compile", "bench_compile.py", args.compile_args)]
    benches = [b for b in benches if args.only in (None, b[0])]
    print(f"results go to {out_dir}", file=sys.stderr, flush=True)
    for i, (name, script, extra) in enumerate(benches, 1):
        print(f"[benchmark {i}/{len(benches)}] {script} ({time.perf_counter() - t0:.0f} s elapsed)", file=sys.stderr, flush=True)
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
        + ([f"--vision-args '{args.vision_args}'"] if args.vision_args else [])
        + ([f"--compile-args '{args.compile_args}'"] if args.compile_args else []))
    env["load_avg_1min"] = load_start  # this run's start (the benchmark processes record their own)
    env["load_avg_1min_end"] = load_average()
    env.setdefault("cpu_count", os.cpu_count())
    payload = {"env": env, "mode": mode, "command": command, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1))
    written = ["results.json"]
    if rows:
        write_markdown(payload, out_dir / "results.md")
        written += ["results.md"] + write_plots(payload, out_dir)
    print(f"wrote {', '.join(written)} to {out_dir} in {payload['seconds']} s", file=sys.stderr)
    note = busy_note(env)
    if note:
        print("note: " + note, file=sys.stderr)
    for err in errors:
        print("error: " + err, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
