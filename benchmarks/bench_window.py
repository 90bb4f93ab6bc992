"""Window attention, forward + backward: gatx's ``WindowAttention`` against Swin's window partition, alternating.

The issue's window goal (Swin-T stage 1: a 56x56 map, C=96, 3 heads, window 7, shift 0 and 3) is a
ratio of two times that differ by a few per cent, less than this shared host moves a phase between
runs. ``bench_vision.py`` times one system after the other, so a cell can carry a change of load, or
the state the previous system left in the caches and the allocator. This script times the two in
turn, one call each with the order rotated every round, and reports the ratio of the medians.

Each case is one (shift, flush-to-zero) pair. Swin's shifted windows add -100 between the regions of a
window, whose softmax weights (exp(-100) ~ 4e-44) are subnormal: on CPUs without fast subnormals they
slow its matmuls by tens of times, so the goal is stated with flush-to-zero on
(``torch.set_flush_denormal(True)``) for both systems, and the rows without it are reported too. Swin's
formulation is ``bench_vision.SwinWindow``, written from the paper (roll by -shift, partition, attention
with the relative position bias and the region mask, reverse, roll back); it loads gatx's weights and
is checked against gatx (output, the input's and every parameter's gradient) before it is timed. The
input requires a gradient, as inside a network.

    python benchmarks/bench_window.py                          # Swin-T stage 1, shifts 0 and 3, FTZ on and off
    python benchmarks/bench_window.py --ftz on --reps 200 --json window.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

from _harness import HelpFormatter, Runs, allocator, alternate, check_runs, environment, load_average, log, write_json
from bench_vision import SwinWindow


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--map", type=int, default=56, help="side of the square feature map")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dim", type=int, default=96, help="channels C")
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--window", type=int, default=7)
    p.add_argument("--shifts", default="0,3", help="comma-separated shifts (each < --window)")
    p.add_argument("--ftz", choices=("on", "off", "both"), default="both",
                   help="flush denormals to zero (torch.set_flush_denormal) for both systems: on, off, or both")
    p.add_argument("--reps", type=int, default=120, help="timed calls per system and case (alternating)")
    p.add_argument("--warmup", type=int, default=10, help="untimed rounds first")
    p.add_argument("--tol", type=float, default=1e-3, help="largest relative difference to gatx accepted before timing")
    p.add_argument("--tiny", action="store_true", help="seconds: a 14x14 map, batch 1, 3 reps (for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write {env, rows} here (default: stdout)")
    args = p.parse_args(argv)
    if args.tiny:
        args.map, args.batch, args.reps, args.warmup = 14, 1, 3, 1
    try:
        args.shifts = [int(s) for s in str(args.shifts).split(",")]
    except ValueError:
        p.error(f"--shifts takes comma-separated integers, got {args.shifts!r}")
    if min(args.batch, args.dim, args.heads, args.window, args.reps) < 1 or args.warmup < 0:
        p.error("--batch, --dim, --heads, --window and --reps must be >= 1, --warmup >= 0")
    if args.map % args.window:
        p.error(f"--map {args.map} is not a whole number of {args.window}x{args.window} windows (Swin pads the map; "
                "not compared here)")
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} does not split into {args.heads} heads")
    if any(not 0 <= s < args.window for s in args.shifts):
        p.error(f"every shift must be in [0, --window); got {args.shifts} with --window {args.window}")
    args.ftz_list = {"on": [True], "off": [False], "both": [True, False]}[args.ftz]
    return args


def systems(args: argparse.Namespace, shift: int) -> Runs:
    """gatx's module and Swin's formulation with the same weights; gradients named as gatx names them."""
    import torch

    from gatx.vision import WindowAttention

    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, args.map, args.map, args.dim, generator=gen).requires_grad_(True)
    torch.manual_seed(args.seed)
    ours = WindowAttention(args.dim, args.window, args.heads, shift_size=shift)
    with torch.no_grad():  # a non-zero bias table, so a wrong table row would show in the check
        ours.relative_position_bias_table.normal_(0.0, 0.02, generator=gen)
    swin = SwinWindow(args.dim, args.heads, args.window, True, "cpu")
    swin.shift = shift
    swin.prepare(args.map, args.map, "cpu")
    swin.load(ours.state_dict())
    return {
        "gatx.WindowAttention": ((lambda: ours(x)), dict(ours.named_parameters()) | {"x": x}),
        "swin-window-partition": ((lambda: swin(x)), swin.named() | {"x": x}),
    }


def run_case(args: argparse.Namespace, shift: int, ftz: bool) -> list[dict[str, Any]]:
    import torch

    case = f"window-{args.map}x{args.map}-k{args.window}" + (f"-s{shift}" if shift else "") + f"-C{args.dim}"
    case += "" if ftz else "-noftz"
    base = {"case": case, "mode": "fwd+bwd", "map": args.map, "batch": args.batch, "dim": args.dim, "heads": args.heads,
            "window": args.window, "shift": shift, "flush_denormal": ftz, "threads": torch.get_num_threads()}
    runs = systems(args, shift)
    gout = torch.randn(args.batch, args.map, args.map, args.dim, generator=torch.Generator().manual_seed(args.seed + 1))
    torch.set_flush_denormal(ftz)
    try:
        diffs = check_runs(runs, gout, "gatx.WindowAttention")
        bad = {name: d for name, d in diffs.items() if not d <= args.tol}
        if bad:
            log(f"{case}: differs from gatx by {bad} (> --tol {args.tol}); not timed")
            return [dict(base, system=name, status="mismatch", max_rel_diff=d) for name, d in diffs.items()]
        load = load_average()
        times = alternate(runs, gout, args.reps, args.warmup)
    finally:
        torch.set_flush_denormal(False)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    swin = med["swin-window-partition"]
    log(f"{case} (B={args.batch}, {base['threads']} threads, flush-to-zero {'on' if ftz else 'off'}, load {load}): "
        + ", ".join(f"{name} {1e3 * m:.2f} ms" for name, m in med.items())
        + f"; gatx / Swin {med['gatx.WindowAttention'] / swin:.3f}")
    return [dict(base, system=name, status="ok", reps=args.reps, median_ms=1e3 * m, min_ms=1e3 * min(times[name]),
                 ratio_to_swin=m / swin, max_rel_diff=diffs[name], load_avg_1min=load) for name, m in med.items()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment("cpu")
    rows = [row for shift in args.shifts for ftz in args.ftz_list for row in run_case(args, shift, ftz)]
    write_json(args.json, env, rows)
    return 0


if __name__ == "__main__":
    allocator("reuse")
    sys.exit(main())
