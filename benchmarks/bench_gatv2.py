"""One GATv2 layer, forward + backward: gatx's ``GATv2Conv`` against DGL's and PyG's, same weights.

GATv2 scores an edge with a vector, ``a . LeakyReLU(W_s h_j + W_d h_i)``, so no kernel takes per-node
scalars as GAT's does: DGL and PyG make (E, H, D) edge tensors (100k nodes, in-degree 20, 8 x 8 heads:
537 MB each), and gatx gathers an edge's (H, D) rows instead, the score computed inside its attention
kernel's passes. The random graphs are ``bench_gat.py``'s (in-degree
20 plus a self-loop, 128 input features). The systems are timed alternately (one call each, repeated),
so a change of load hits all of them; each is checked against gatx first (output and every parameter's
gradient, relative difference at most ``--tol``). The 1-minute load average is recorded per case.

gatx runs ``backend=None`` (on the CPU: the score, softmax and aggregation as one kernel of gatx's fused
library; where it is unavailable, the default backend's edge primitives)
and ``backend="torch"``. PyG's layer is built without added self-loops, its weights mapped from gatx's
(``lin_l`` / ``lin_r`` are ``fc_src`` / ``fc_dst``, its output bias zero).

    python benchmarks/bench_gatv2.py                          # 10k and 100k nodes
    python benchmarks/bench_gatv2.py --sizes 100000 --reps 5 --json gatv2.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

from _harness import (HelpFormatter, Runs, Skip, allocator, alternate, check_runs, environment, load_average, log,
                      quiet_import_dgl, write_json)
from bench_gat import HEADS, OUT_FEATS, random_case


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--sizes", default="10000,100000", help="comma-separated random-graph node counts")
    p.add_argument("--in-feats", type=int, default=128, help="input width")
    p.add_argument("--reps", type=int, default=5, help="timed calls per system (alternating; the median is reported)")
    p.add_argument("--tol", type=float, default=1e-3, help="largest relative difference to gatx accepted before timing")
    p.add_argument("--tiny", action="store_true", help="seconds: 500 nodes, 2 reps (for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write {env, rows} here (default: stdout)")
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes, args.reps = "500", 2
    try:
        args.sizes = [int(s) for s in str(args.sizes).split(",")]
    except ValueError:
        p.error(f"--sizes takes comma-separated integers, got {args.sizes!r}")
    if args.reps < 1 or any(n < 2 for n in args.sizes):
        p.error("--reps must be >= 1 and every size >= 2")
    return args


def systems(c: dict[str, Any]) -> tuple[Runs, dict[str, str]]:
    """The systems that run here, and {system: why not} for the others."""
    import torch

    import gatx

    layer = gatx.GATv2Conv(c["in_feats"], OUT_FEATS, HEADS)
    graph = gatx.Graph(c["src"], c["dst"], c["n"], c["n"])
    params = dict(layer.named_parameters())
    runs: Runs = {
        "gatx": ((lambda: layer(graph, c["feat"])), params),
        "gatx[torch]": ((lambda: layer(graph, c["feat"], backend="torch")), params),
    }
    skipped: dict[str, str] = {}
    try:
        dgl = quiet_import_dgl()
        ref = dgl.nn.pytorch.GATv2Conv(c["in_feats"], OUT_FEATS, HEADS)
        ref.load_state_dict(layer.state_dict())  # DGL's parameter names are gatx's
        g = dgl.graph((c["src"], c["dst"]), num_nodes=c["n"])
        runs["dgl.GATv2Conv"] = ((lambda: ref(g, c["feat"])), dict(ref.named_parameters()))
    except ImportError as err:
        skipped["dgl.GATv2Conv"] = f"DGL is not importable: {err}"
    try:
        from torch_geometric.nn import GATv2Conv as PygGATv2Conv

        pyg = PygGATv2Conv(c["in_feats"], OUT_FEATS, heads=HEADS, add_self_loops=False)
        names = {"fc_src.weight": "lin_l.weight", "fc_src.bias": "lin_l.bias", "fc_dst.weight": "lin_r.weight",
                 "fc_dst.bias": "lin_r.bias", "attn": "att"}
        theirs = dict(pyg.named_parameters())
        if set(theirs) != set(names.values()) | {"bias"}:
            raise Skip(f"unexpected PyG GATv2Conv parameters {sorted(theirs)}; update the name map")
        with torch.no_grad():
            for ours, name in names.items():
                theirs[name].copy_(params[ours].view_as(theirs[name]))
            theirs["bias"].zero_()
        edge_index = torch.stack([c["src"], c["dst"]])
        n = c["n"]
        runs["pyg.GATv2Conv"] = ((lambda: pyg(c["feat"], edge_index).view(n, HEADS, OUT_FEATS)),
                                 {o: theirs[t] for o, t in names.items()})
    except (ImportError, Skip) as err:
        skipped["pyg.GATv2Conv"] = str(err)
    return runs, skipped


def run_case(n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    c = random_case(n, args.in_feats, args.seed)
    c.update(n=n, in_feats=args.in_feats)
    case = f"random-{n}"
    runs, skipped = systems(c)
    gout = torch.randn(n, HEADS, OUT_FEATS)
    diffs = check_runs(runs, gout, "gatx")
    rows = [{"case": case, "system": name, "mode": "fwd+bwd", "status": "skipped", "reason": why}
            for name, why in skipped.items()]
    for name, d in diffs.items():
        if not d <= args.tol:
            rows.append({"case": case, "system": name, "mode": "fwd+bwd", "status": "mismatch", "max_rel_diff": d})
            log(f"  {name}: differs from gatx by {d:.2e} (> --tol {args.tol}); not timed")
    runs = {name: run for name, run in runs.items() if diffs[name] <= args.tol}
    load = load_average()
    times = alternate(runs, gout, args.reps)
    base = statistics.median(times["gatx"])
    ref = statistics.median(times["dgl.GATv2Conv"]) if "dgl.GATv2Conv" in times else None
    log(f"{case} ({c['src'].numel():,} edges), {torch.get_num_threads()} threads, load {load}:")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({
            "case": case, "system": name, "mode": "fwd+bwd", "status": "ok", "nodes": n, "edges": int(c["src"].numel()),
            "threads": torch.get_num_threads(), "reps": args.reps, "median_ms": 1e3 * med, "min_ms": 1e3 * min(ts),
            "ratio_to_gatx": med / base, "ratio_to_dgl": med / ref if ref else None, "max_rel_diff": diffs[name],
            "load_avg_1min": load,
        })
        vs = f", {med / ref:.3f}x DGL's" if ref else ""
        log(f"  {name:15s} {1e3 * med:9.1f} ms (min {1e3 * min(ts):.1f}){vs}; max rel diff to gatx {diffs[name]:.1e}")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.manual_seed(args.seed)
    env = environment("cpu")
    rows = [row for n in args.sizes for row in run_case(n, args)]
    write_json(args.json, env, rows)
    return 0


if __name__ == "__main__":
    allocator("reuse")
    sys.exit(main())
