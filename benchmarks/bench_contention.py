"""How much one GAT layer slows down when other processes compete for the cores: gatx against DGL.

A shared machine rarely runs one job. This script times one GAT layer (8 heads x 8 features) forward
+ backward on a random graph (in-degree 20 plus a self-loop, as ``bench_gat.py``) for gatx
(``backend=None``) and ``dgl.nn.GATConv`` (same weights, checked to agree first), twice:

1. *quiet*: nothing else started by this script;
2. *contended*: ``--busy`` extra processes beside it, each a float32 GEMM loop on ``--busy-threads``
   threads (another training job's compute and memory traffic; 1 by default, and the cores' count is
   torch's default for a job that nobody tuned), started before and stopped after the phase.
   ``--busy-kind`` swaps the GEMMs for neighbours that load one part of the machine: ``spin`` (an
   integer loop: the cores only) or ``copy`` (copies of a 64 MB buffer: memory bandwidth), which tells
   a loss to lost core time from a loss to shared caches and memory.

The two systems are timed alternately (one call each, repeated), so a change of load during a phase
hits both. Each system's *slowdown* is its contended median / its quiet median; the result to read
is gatx's slowdown next to DGL's (issue goal: gatx's no worse). The 1-minute load average is recorded
before each phase: the quiet phase is only quiet if nothing else runs on the machine.

A shared host drifts over minutes (other tenants' load), which moves one phase against the next. With
``--rounds R`` the three phases run R times in turn; the medians pool every round's calls, and each
row also gives every round's own slowdown (``round_slowdowns``), so a verdict can be read round by
round (``rounds_no_worse``: the rounds in which gatx's slowdown is at most DGL's).

A third phase times both quiet on one thread, for two more columns that help read the slowdown:

- ``speedup_1_to_n``: quiet 1-thread median / quiet median, how much the second core buys;
- ``contended_over_1thread``: contended median / quiet 1-thread median. With ``--busy`` single-thread
  processes beside an n-thread job on n cores, the scheduler's fair share gives the job about
  n * n / (n + busy) cores (one core for 2 threads beside 2 busy processes), so this is the loss
  beyond a fair share: lost wake-ups, threads waiting for a descheduled one, the neighbours' cache
  traffic. The slowdown is about ``contended_over_1thread * speedup_1_to_n``: a system that uses its
  second core better shows a larger slowdown for the same loss.

Each call's CPU time (the process's user + system time, all its threads: ``time.process_time``) is
recorded beside its wall time, which splits that loss in two:

- ``cores_contended``: contended CPU / contended wall, the cores the system actually got beside the
  neighbours (a fair share is about 1 with the defaults). Below the fair share: the scheduler gave it
  less (threads asleep waiting for a descheduled one, slow wake-ups).
- ``cpu_over_1thread``: contended CPU / quiet 1-thread CPU, the work done for one call beside the
  neighbours against the work alone. Above 1: the same work took more CPU (threads spinning at a barrier
  while their partner is off its core, caches and TLB refilled after each switch, the neighbours' memory
  traffic); ``cpu_quiet_over_1thread`` is the same for the quiet n-thread phase (spinning and parallel
  overhead alone).

so that ``contended_over_1thread`` is about ``cpu_over_1thread / cores_contended``.

The slowdown itself splits exactly (a product of the medians' ratios) into three factors:
``slowdown = cores_quiet * cpu_over_quiet / cores_contended``, where ``cores_quiet`` is quiet CPU / quiet
wall (the cores the system keeps busy alone, spinning included) and ``cpu_over_quiet`` is contended CPU /
quiet CPU on the same threads: the CPU the same call costs more beside the neighbours. That factor
compares two systems' losses to contention without their different 1 -> n thread scaling (a system whose
second thread adds parallel overhead when quiet shows it in ``cpu_quiet_over_1thread``, not here).

    python benchmarks/bench_contention.py                      # 100k nodes, 2 busy processes
    python benchmarks/bench_contention.py --nodes 2708 --busy 2 --json contention.json
    python benchmarks/bench_contention.py --rounds 3 --busy-threads 2   # 3 rounds; neighbours on every core
    python benchmarks/bench_contention.py --rounds 2 --busy-kind copy   # neighbours that take memory bandwidth
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from _harness import (HelpFormatter, Runs, Skip, allocator, check_runs, environment, fwd_bwd, load_average, log,
                      quiet_import_dgl, write_json)
from bench_gat import HEADS, OUT_FEATS, random_case

# the busy neighbours, each a loop that runs until it is stopped (the first line marks them, so a test can
# find any left running). They load different parts of the machine, to tell the losses apart:
BUSY_MARK = "# gatx bench_contention busy neighbour\n"
BUSY_CODES = {
    # another training job: float32 GEMMs (cores, vector units and a 3 MB working set in the caches)
    "gemm": (BUSY_MARK + "import sys, torch\n"
             "torch.set_num_threads(int(sys.argv[1]))\n"
             "a = torch.randn(512, 512); b = torch.randn(512, 512)\n"
             "while True:\n"
             "    a.matmul(b)\n"),
    # cores only: an integer loop in the interpreter, a working set of a few KB (one thread per process)
    "spin": BUSY_MARK + "x = 0\nwhile True:\n    x += 1\n",
    # memory bandwidth: copies of a 64 MB buffer, far beyond the caches
    "copy": (BUSY_MARK + "import sys, torch\n"
             "torch.set_num_threads(int(sys.argv[1]))\n"
             "a = torch.randn(16_000_000); b = torch.empty_like(a)\n"
             "while True:\n"
             "    b.copy_(a)\n"),
}

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--nodes", type=int, default=100_000, help="random-graph node count")
    p.add_argument("--in-feats", type=int, default=128, help="input width")
    p.add_argument("--busy", type=int, default=2, help="busy processes started beside it in the contended phase")
    p.add_argument("--busy-threads", type=int, default=1, help="threads of each busy process")
    p.add_argument("--busy-kind", choices=sorted(BUSY_CODES), default="gemm",
                   help="what each busy process runs: GEMMs (compute and caches), an integer loop (cores only; one "
                        "thread) or copies of a 64 MB buffer (memory bandwidth)")
    p.add_argument("--rounds", type=int, default=1, help="times the three phases run in turn (pooled; per-round slowdowns too)")
    p.add_argument("--reps", type=int, default=7, help="timed calls per system and phase (alternating)")
    p.add_argument("--tiny", action="store_true", help="seconds: 2,000 nodes, 1 busy process, 3 reps (for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write {env, rows} here (default: stdout)")
    args = p.parse_args(argv)
    if args.tiny:
        args.nodes, args.busy, args.reps = 2000, 1, 3
    if args.nodes < 2 or min(args.busy, args.reps, args.busy_threads, args.rounds) < 1:
        p.error(f"--nodes must be >= 2, --busy, --busy-threads, --reps and --rounds >= 1; got {args.nodes}, {args.busy}, "
                f"{args.busy_threads}, {args.reps}, {args.rounds}")
    if args.busy_kind == "spin" and args.busy_threads != 1:
        p.error(f"--busy-kind spin runs one thread per process (an interpreter loop); got --busy-threads "
                f"{args.busy_threads}: use --busy for more of them")
    return args


def systems(c: dict[str, Any]) -> Runs:
    """gatx and DGL with the same weights (DGL's parameter names are gatx's)."""
    import gatx

    layer = gatx.GATConv(c["in_feats"], OUT_FEATS, HEADS)
    graph = gatx.Graph(c["src"], c["dst"], c["n"], c["n"])
    out = {"gatx": ((lambda: layer(graph, c["feat"])), dict(layer.named_parameters()))}
    try:
        dgl = quiet_import_dgl()
    except ImportError as err:
        raise Skip(f"DGL is not importable: {err}") from err
    ref = dgl.nn.pytorch.GATConv(c["in_feats"], OUT_FEATS, HEADS)
    ref.load_state_dict(layer.state_dict())
    g = dgl.graph((c["src"], c["dst"]), num_nodes=c["n"])
    out["dgl"] = ((lambda: ref(g, c["feat"])), dict(ref.named_parameters()))
    return out


def timed(runs: Runs, gout: Any, reps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds per fwd+bwd (CPU: this process's threads, not the busy neighbours), the systems
    called alternately ``reps`` times (after one warm-up each)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(reps + 1):
        for name, (forward, params) in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fwd_bwd(forward, gout, list(params.values()))
            t1, c1 = time.perf_counter(), time.process_time()
            if rep:
                times[name].append(t1 - t0)
                cpu[name].append(c1 - c0)
    return times, cpu


def start_busy(n: int, threads: int = 1, kind: str = "gemm") -> list[subprocess.Popen]:
    """``n`` busy processes (``BUSY_CODES[kind]`` on ``threads`` threads each), running when this returns."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_CODES[kind], str(threads)], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
    time.sleep(1.0)  # let them import torch and reach their loop
    dead = [p.returncode for p in procs if p.poll() is not None]
    if dead:
        stop_busy(procs)
        raise RuntimeError(f"a busy process exited at once (codes {dead}); run {sys.executable} -c on its code to see why")
    return procs


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def run_round(runs: Runs, gout: Any, args: argparse.Namespace, threads: int, index: int) -> dict[str, dict[str, Any]]:
    """One round: the quiet, quiet 1-thread and contended phases, {phase: {load_avg_1min, times, cpu}}."""
    import torch

    phases: dict[str, dict[str, Any]] = {}
    for phase in ("quiet", "quiet_1thread", "contended"):
        load = load_average()
        procs = start_busy(args.busy, args.busy_threads, args.busy_kind) if phase == "contended" else []
        torch.set_num_threads(1 if phase == "quiet_1thread" else threads)
        try:
            times, cpu = timed(runs, gout, args.reps)
        finally:
            stop_busy(procs)
            torch.set_num_threads(threads)
        phases[phase] = {"load_avg_1min": load, "times": times, "cpu": cpu}
        log(f"  round {index + 1} {phase:13s} (load {load}): " + ", ".join(
            f"{name} {1e3 * statistics.median(ts):.1f} ms (CPU {1e3 * statistics.median(cpu[name]):.1f})"
            for name, ts in times.items()))
    return phases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.manual_seed(args.seed)
    c = random_case(args.nodes, args.in_feats, args.seed)
    c.update(n=args.nodes, in_feats=args.in_feats)
    env = environment("cpu")
    try:
        runs = systems(c)
    except Skip as err:
        log(f"skipped: {err}")
        write_json(args.json, env, [{"status": "skipped", "reason": str(err)}])
        return 0
    gout = torch.randn(args.nodes, HEADS, OUT_FEATS)
    diff = check_runs(runs, gout, "gatx")["dgl"]
    log(f"random-{args.nodes} ({c['src'].numel():,} edges), {torch.get_num_threads()} threads: "
        f"DGL vs gatx max relative difference {diff:.2e}")
    if not diff <= 1e-3:
        raise SystemExit(f"DGL and gatx disagree (relative difference {diff:.2e}); not timing")
    threads = torch.get_num_threads()
    rounds = [run_round(runs, gout, args, threads, r) for r in range(args.rounds)]
    per_round = {name: [statistics.median(r["contended"]["times"][name]) / statistics.median(r["quiet"]["times"][name])
                        for r in rounds] for name in runs}
    no_worse = sum(g <= d for g, d in zip(per_round["gatx"], per_round["dgl"]))
    rows = []
    for name in runs:
        quiet, one, busy = (statistics.median([t for r in rounds for t in r[ph]["times"][name]])
                            for ph in ("quiet", "quiet_1thread", "contended"))
        cpu_quiet, cpu_one, cpu_busy = (statistics.median([t for r in rounds for t in r[ph]["cpu"][name]])
                                        for ph in ("quiet", "quiet_1thread", "contended"))
        rows.append({
            "case": f"random-{args.nodes}", "system": name, "mode": "fwd+bwd", "status": "ok",
            "threads": threads, "busy_processes": args.busy, "busy_threads": args.busy_threads,
            "busy_kind": args.busy_kind, "reps": args.reps,
            "rounds": args.rounds,
            "quiet_median_ms": 1e3 * quiet, "quiet_1thread_median_ms": 1e3 * one, "contended_median_ms": 1e3 * busy,
            "slowdown": busy / quiet, "speedup_1_to_n": one / quiet, "contended_over_1thread": busy / one,
            "quiet_cpu_ms": 1e3 * cpu_quiet, "quiet_1thread_cpu_ms": 1e3 * cpu_one, "contended_cpu_ms": 1e3 * cpu_busy,
            "cores_contended": cpu_busy / busy, "cpu_over_1thread": cpu_busy / cpu_one,
            "cpu_quiet_over_1thread": cpu_quiet / cpu_one,
            "cores_quiet": cpu_quiet / quiet, "cpu_over_quiet": cpu_busy / cpu_quiet,
            "round_slowdowns": per_round[name], "rounds_no_worse": no_worse,
            **{f"{ph}_load_avg": [r[ph]["load_avg_1min"] for r in rounds] for ph in ("quiet", "quiet_1thread", "contended")},
            "max_rel_diff": diff,
        })
        log(f"  {name}: slowdown x{busy / quiet:.2f} with {args.busy} busy {args.busy_kind} processes of {args.busy_threads} thread(s) "
            f"(1 -> {threads} threads x{one / quiet:.2f} faster; contended / quiet on 1 thread x{busy / one:.2f}: "
            f"CPU per call x{cpu_busy / cpu_one:.2f} on {cpu_busy / busy:.2f} cores; {cpu_quiet / quiet:.2f} cores "
            f"quiet x CPU per call x{cpu_busy / cpu_quiet:.2f} against quiet / {cpu_busy / busy:.2f} cores); "
            f"per round " + " ".join(f"{s:.2f}" for s in per_round[name]))
    log(f"  gatx's slowdown at most DGL's in {no_worse} of {args.rounds} rounds")
    write_json(args.json, env, rows)
    return 0


if __name__ == "__main__":
    allocator("reuse")
    sys.exit(main())
