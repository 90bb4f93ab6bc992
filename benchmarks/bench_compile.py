"""Benchmark ``torch.compile`` against eager: fwd+bwd of one GAT layer and one vision module.

Cases (CPU sizes; ``--quick`` and ``--tiny`` shrink them):

- ``gat``: ``gatx.GATConv(64, 8, num_heads=8)`` on a random graph of ``--nodes`` nodes (default 10,000)
  with in-degree ``--degree`` (default 10) plus self-loops, 64 input features;
- ``na``: ``gatx.vision.NeighborhoodAttention2d(64, 4, kernel_size=7)`` on a (2, m, m, 64) map,
  m = ``--map`` (default 56; ``--quick`` 28).

Per case, three systems, each checked against eager (output and every parameter gradient) before it
is timed: ``eager``; ``compile[fullgraph]`` = ``torch.compile(model, fullgraph=True)``; and, only
when the fullgraph compile fails, ``compile[partial]`` = ``fullgraph=False`` (graph breaks allowed),
in its own row so the two are never confused. A compile that fails gives a row with status
``failed`` and the exception's first line as the reason instead of stopping the run. ``compile_s``
is the wall time of the first call (tracing, code generation and one fwd+bwd: the one-time cost);
``median_ms`` the median of later calls. ``--compiler`` picks the torch.compile backend (default
``inductor``; ``--tiny`` uses ``aot_eager``, which traces and partitions without generating code, so
the path stays exercised in seconds by tests).

    python benchmarks/bench_compile.py --quick --json compile.json
    python benchmarks/bench_compile.py --nodes 100000 --map 112 --device cuda
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

from _harness import HelpFormatter, cuda_missing, environment, fwd_bwd, load_average, log, max_diff, measure, peak_memory, allocator, write_json

SYSTEMS = ("eager", "compile[fullgraph]", "compile[partial]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CPU sizes for a run of a few minutes")
    size.add_argument("--tiny", action="store_true", help="seconds: tiny sizes and the aot_eager compiler (for tests)")
    p.add_argument("--nodes", type=int, default=None, help="GAT graph nodes (default 10000; tiny 300)")
    p.add_argument("--degree", type=int, default=10, help="GAT in-degree (random sources) before self-loops")
    p.add_argument("--map", type=int, default=None, help="vision map side m of a (2, m, m, 64) input (default 56; quick 28; tiny 8)")
    p.add_argument("--cases", default="gat,na", help="comma-separated: gat, na")
    p.add_argument("--compiler", default=None, help="torch.compile backend (default inductor; tiny aot_eager)")
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="seconds per timing phase before stopping early (>= 3 reps)")
    p.add_argument("--tol", type=float, default=1e-3, help="largest relative difference to eager that still counts as equal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in args.cases if c not in ("gat", "na")]
    if bad or not args.cases:
        p.error(f"--cases must list gat and/or na, got {bad or 'nothing'}")
    if args.tiny:
        nodes, side, compiler, warmup, reps, budget = 300, 8, "aot_eager", 1, 2, 0.5
    elif args.quick:
        nodes, side, compiler, warmup, reps, budget = 10_000, 28, "inductor", 2, 7, 5.0
    else:
        nodes, side, compiler, warmup, reps, budget = 10_000, 56, "inductor", 3, 15, 15.0
    args.nodes = nodes if args.nodes is None else args.nodes
    args.map = side if args.map is None else args.map
    args.compiler = compiler if args.compiler is None else args.compiler
    args.warmup = warmup if args.warmup is None else args.warmup
    args.reps = reps if args.reps is None else args.reps
    args.budget = budget if args.budget is None else args.budget
    if args.nodes < 1 or args.degree < 1 or args.map < 7:
        p.error(f"--nodes and --degree must be >= 1 and --map >= 7 (the kernel size), got {args.nodes}, {args.degree}, {args.map}")
    return args


def build_case(name: str, args: argparse.Namespace) -> tuple[Any, Callable[[Any], Any], dict[str, Any]]:
    """(model, forward(model) -> output, row fields describing the case)."""
    import torch

    import gatx

    gen = torch.Generator().manual_seed(args.seed)
    dev = args.device
    if name == "gat":
        N, d = args.nodes, args.degree
        src = torch.randint(0, N, (N * d,), generator=gen)
        dst = torch.arange(N).repeat_interleave(d)
        g = gatx.Graph(src, dst, N, N).add_self_loops().to(dev)
        x = torch.randn(N, 64, generator=gen).to(dev)
        model = gatx.GATConv(64, 8, num_heads=8).to(dev)
        return model, lambda m: m(g, x), {"case": f"GATConv N={N:,} deg={d}", "nodes": N, "edges": g.num_edges}
    from gatx.vision import NeighborhoodAttention2d

    m = args.map
    x = torch.randn(2, m, m, 64, generator=gen).to(dev)
    model = NeighborhoodAttention2d(64, 4, kernel_size=7).to(dev)
    return model, lambda mod: mod(x), {"case": f"NeighborhoodAttention2d {m}x{m} k=7", "map": m}


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def run_case(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    model, forward, base = build_case(name, args)
    base = dict(base, bench="compile", mode="fwd+bwd", reference="eager", compiler=args.compiler)
    params = list(model.parameters())
    named = dict(model.named_parameters())
    sync = (lambda: torch.cuda.synchronize()) if args.device.startswith("cuda") else (lambda: None)
    gout = torch.randn_like(forward(model).detach())
    out = fwd_bwd(lambda: forward(model), gout, params)
    ref = {"out": out.detach().clone()} | {k: p.grad.clone() for k, p in named.items()}
    rows: list[dict[str, Any]] = []

    def timed(system: str, fn: Callable[[], Any], extra: dict[str, Any]) -> dict[str, Any]:
        def call() -> None:
            fwd_bwd(fn, gout, params)
        mem = peak_memory(call, args.device)
        t = measure(call, args.device, args.warmup, args.reps, args.budget)
        row = dict(base, system=system, status="ok", **t, peak_mem_mib=mem.mib, mem_method=mem.method,
                   load_avg_1min=load_average(), **extra)
        log(f"  {system:<20s} {row['median_ms']:10.2f} ms (min {row['min_ms']:.2f}, {row['reps']} reps)"
            + (f", compile {extra['compile_s']:.1f} s" if "compile_s" in extra else ""))
        return row

    eager = timed("eager", lambda: forward(model), {"max_abs_diff": 0.0, "max_rel_diff": 0.0})
    rows.append(eager)
    for system, fullgraph in (("compile[fullgraph]", True), ("compile[partial]", False)):
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=fullgraph, backend=args.compiler)
        t0 = time.perf_counter()
        try:
            got = fwd_bwd(lambda: forward(compiled), gout, params)
            sync()
        except Exception as err:  # noqa: BLE001 - a compile failure is a result: recorded, not raised
            rows.append(dict(base, system=system, status="failed", fullgraph=fullgraph, reason=first_line(err)))
            log(f"  {system:<20s} failed: {rows[-1]['reason']}")
            continue
        compile_s = time.perf_counter() - t0
        d_abs, d_rel = max_diff({"out": got.detach()} | {k: p.grad for k, p in named.items()}, ref)
        check = {"max_abs_diff": d_abs, "max_rel_diff": d_rel, "fullgraph": fullgraph, "compile_s": round(compile_s, 2)}
        if not d_rel <= args.tol:
            rows.append(dict(base, system=system, status="mismatch", reason=f"relative difference {d_rel:.2e} > tol {args.tol}", **check))
            log(f"  {system:<20s} mismatch: {rows[-1]['reason']}")
            continue
        row = timed(system, lambda: forward(compiled), check)
        row["speedup_vs_eager"] = round(eager["median_ms"] / row["median_ms"], 3)
        rows.append(row)
        break  # fullgraph=True worked: no partial row
    torch._dynamo.reset()
    return rows


def markdown_section(rows: list[dict[str, Any]]) -> list[str]:
    """The report's section: eager vs compiled fwd+bwd per case, from the same run."""
    rows = [r for r in rows if r.get("bench") == "compile"]
    if not rows:
        return []
    cases = list(dict.fromkeys(r["case"] for r in rows))
    by = {(r["case"], r["system"]): r for r in rows}
    out = ["## torch.compile vs eager (fwd+bwd, same run)", "",
           f"Compiler `{rows[0].get('compiler')}`; compile = wall time of the first call (tracing, code generation "
           "and one fwd+bwd); times are median (min) ms; speedup = eager median / compiled median (the same for the "
           "minima); a fullgraph=False time is given only when fullgraph=True failed.", "",
           "| case | eager ms | fullgraph=True ms | speedup | compile s | fullgraph=False ms | speedup | compile s | load avg |",
           "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for c in cases:
        e = by.get((c, "eager"), {})
        cells = [c, f"{e['median_ms']:.1f} ({e['min_ms']:.1f})" if e.get("status") == "ok" else "-"]
        for system in SYSTEMS[1:]:
            r = by.get((c, system))
            if r is None:
                cells += ["-", "-", "-"]
            elif r["status"] == "ok":
                best = e["min_ms"] / r["min_ms"] if e.get("status") == "ok" else float("nan")
                cells += [f"{r['median_ms']:.1f} ({r['min_ms']:.1f})", f"{r['speedup_vs_eager']:.2f}x ({best:.2f}x)", f"{r['compile_s']:.1f}"]
            else:
                cells += [r["status"], "-", f"{r['compile_s']:.1f}" if "compile_s" in r else "-"]
                notes.append(f"- {c}, {system}: {r['status']}: {r.get('reason', '')}")
        loads = [r.get("load_avg_1min") for r in rows if r["case"] == c and r.get("load_avg_1min") is not None]
        cells.append(", ".join(f"{x:.1f}" for x in loads) or "-")
        out.append("| " + " | ".join(cells) + " |")
    return out + [""] + notes + [""]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if cuda_missing(args.device):
        return 2
    env = environment(args.device)
    env["load_avg_1min"] = load_average()
    log(f"bench_compile on {env['device']}, {env['threads']} threads, torch {env['torch']}, compiler {args.compiler}")
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(args.cases, 1):
        log(f"[bench_compile case {i}/{len(args.cases)}] {name}")
        try:
            rows += run_case(name, args)
        except Exception as err:  # noqa: BLE001 - the eager model itself failed: say so, run the other cases
            rows.append({"bench": "compile", "case": name, "system": "eager", "mode": "fwd+bwd", "status": "failed",
                         "reason": first_line(err)})
            log(f"  eager failed: {rows[-1]['reason']}")
    env["load_avg_1min_end"] = load_average()
    write_json(args.json, env, rows)
    return 0


if __name__ == "__main__":
    allocator("reuse")
    sys.exit(main())
