"""One GAT layer on a sampled block (a mini-batch's first layer): gatx's aggregate-first path against
its project-first path, DGL's GATConv and PyG's GATConv, fwd+bwd.

Neighbour sampling gives a block whose src rows outnumber its dst rows about fanout to one, and almost
every src row has a single edge. Projecting every src row (``W x_j``, what DGL and PyG do, and gatx's
project-first path) then costs GEMMs over N_src rows of F x H*D; gatx's aggregate-first path sums the
input rows per head over the edges (the fused kernel with x as values that every head reads) and
projects only the N_dst aggregates. ``gatx`` below is ``backend=None`` with gatx's own cost rule
deciding (the row says which path it took); ``gatx[project-first]`` forces the other path.

The block: ``--dst`` seed nodes, ``--fanout`` edges into each from random nodes of a ``--nodes``-node
graph, src ids relabelled with the dst nodes first (as DGL's ``to_block``); the input x needs no
gradient (the model's input features). Every system gets the same weights and is checked against gatx's
float64 project-first result first; the systems are then timed alternately (one call each, repeated), so
a change of load hits all of them. Ratios are to DGL's median in the same run.

    python benchmarks/bench_block.py                        # 20k dst, fanout 10, 1M-node graph, 128 -> 8 x 32
    python benchmarks/bench_block.py --dst 100000 --json block.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

from _harness import (HelpFormatter, Skip, allocator, environment, fwd_bwd, load_average, log, max_diff, pyg_gat,
                      quiet_import_dgl, write_json)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--dst", type=int, default=20000, help="dst (seed) nodes of the block")
    p.add_argument("--fanout", type=int, default=10, help="sampled in-edges per dst node")
    p.add_argument("--nodes", type=int, default=1_000_000, help="nodes of the graph sampled from")
    p.add_argument("--in-feats", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--out-feats", type=int, default=32, help="features per head")
    p.add_argument("--reps", type=int, default=7, help="timed calls per system (alternating)")
    p.add_argument("--tiny", action="store_true", help="seconds: 500 dst nodes, 2 reps (for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write {env, rows} here (default: stdout)")
    args = p.parse_args(argv)
    if args.tiny:
        args.dst, args.nodes, args.reps = 500, 20000, 2
    if min(args.dst, args.fanout, args.nodes, args.in_feats, args.heads, args.out_feats, args.reps) < 1:
        p.error("every size and --reps must be >= 1")
    return args


def block(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    dst = torch.arange(args.dst).repeat_interleave(args.fanout)
    nbr = torch.randint(0, args.nodes, (dst.numel(),), generator=gen)
    uniq, inv = torch.unique(torch.cat([torch.arange(args.dst), nbr]), return_inverse=True)
    n_src = uniq.numel()
    return {"src": inv[args.dst:], "dst": dst, "n_src": n_src, "n_dst": args.dst,
            "feat": torch.randn(n_src, args.in_feats, generator=gen)}


Runs = dict[str, tuple[Callable[[], Any], dict[str, Any]]]  # {system: (forward, {gatx parameter name: parameter})}


def systems(c: dict[str, Any], args: argparse.Namespace) -> tuple[Runs, dict[str, str]]:
    """The systems with one set of weights, and the reason for each one that cannot run."""
    import torch

    import gatx
    import gatx.nn.gatconv as gatconv

    H, D, F = args.heads, args.out_feats, args.in_feats
    layer = gatx.GATConv(F, D, H)
    graph = gatx.Graph(c["src"], c["dst"], c["n_src"], c["n_dst"], is_block=True)
    feat = c["feat"]

    def project_first() -> Any:
        gatconv.AGGREGATE_FIRST = False
        try:
            return layer(graph, feat)
        finally:
            gatconv.AGGREGATE_FIRST = None

    c["path"] = "aggregate-first" if gatconv.aggregates_first(graph, feat, H, D, None) else "project-first"
    c["state"] = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    runs: Runs = {"gatx": ((lambda: layer(graph, feat)), dict(layer.named_parameters())),
                  "gatx[project-first]": (project_first, dict(layer.named_parameters()))}
    skipped: dict[str, str] = {}
    try:
        dgl = quiet_import_dgl()
        ref = dgl.nn.pytorch.GATConv(F, D, H)
        ref.load_state_dict(c["state"])
        g = dgl.create_block((c["src"], c["dst"]), num_src_nodes=c["n_src"], num_dst_nodes=c["n_dst"])
        runs["dgl.GATConv"] = ((lambda: ref(g, feat)), dict(ref.named_parameters()))
    except ImportError as err:
        skipped["dgl.GATConv"] = f"DGL is not importable: {err}"
    try:
        pyg, params = pyg_gat(F, D, H, c["state"])
        edge_index = torch.stack([c["src"], c["dst"]])
        n_dst = c["n_dst"]
        runs["pyg.GATConv"] = ((lambda: pyg((feat, feat[:n_dst]), edge_index).view(n_dst, H, D)), params)
    except Skip as err:
        skipped["pyg.GATConv"] = str(err)
    return runs, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    import gatx
    import gatx.nn.gatconv as gatconv

    torch.manual_seed(args.seed)
    c = block(args)
    env = environment("cpu")
    runs, skipped = systems(c, args)
    n_edges = c["src"].numel()
    log(f"block: {c['n_dst']:,} dst, {c['n_src']:,} src, {n_edges:,} edges, {args.in_feats} -> {args.heads} x "
        f"{args.out_feats}, {torch.get_num_threads()} threads; gatx's rule: {c['path']}")
    gout = torch.randn(c["n_dst"], args.heads, args.out_feats)
    # the reference: gatx's project-first path in float64, on the same weights
    ref_layer = gatx.GATConv(args.in_feats, args.out_feats, args.heads).double()
    ref_layer.load_state_dict({k: v.double() for k, v in c["state"].items()})
    graph = gatx.Graph(c["src"], c["dst"], c["n_src"], c["n_dst"], is_block=True)
    gatconv.AGGREGATE_FIRST = False
    try:
        out = fwd_bwd(lambda: ref_layer(graph, c["feat"].double()), gout.double(), list(ref_layer.parameters()))
    finally:
        gatconv.AGGREGATE_FIRST = None
    ref = {"out": out.detach()} | {k: p.grad.detach().clone() for k, p in ref_layer.named_parameters()}
    diffs = {}
    for name, (forward, params) in runs.items():
        got = fwd_bwd(forward, gout, list(params.values()))
        diffs[name] = max_diff({"out": got} | {k: p.grad for k, p in params.items()}, ref)[1]
        log(f"  {name}: max relative difference to the float64 reference {diffs[name]:.2e}")
        if not diffs[name] <= 1e-3:
            raise SystemExit(f"{name} disagrees with the reference ({diffs[name]:.2e}); not timing")
    load = load_average()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(args.reps + 1):
        for name, (forward, params) in runs.items():
            t0 = time.perf_counter()
            fwd_bwd(forward, gout, list(params.values()))
            if rep:
                times[name].append(time.perf_counter() - t0)
    anchor = statistics.median(times["dgl.GATConv"]) if "dgl.GATConv" in times else None
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({
            "bench": "block", "case": f"block-{c['n_dst']}x{args.fanout}", "system": name, "mode": "fwd+bwd",
            "status": "ok", "dst": c["n_dst"], "src": c["n_src"], "edges": n_edges, "in_feats": args.in_feats,
            "heads": args.heads, "out_feats": args.out_feats, "threads": torch.get_num_threads(), "reps": args.reps,
            "path": c["path"] if name == "gatx" else ("project-first" if name == "gatx[project-first]" else None),
            "median_ms": 1e3 * med, "times_ms": [1e3 * t for t in ts], "ratio_to_dgl": med / anchor if anchor else None,
            "max_rel_diff": diffs[name], "load_avg_1min": load,
        })
        log(f"  {name}: {1e3 * med:.1f} ms" + (f" ({med / anchor:.2f}x DGL)" if anchor else ""))
    rows += [{"bench": "block", "system": name, "status": "skipped", "reason": why} for name, why in skipped.items()]
    write_json(args.json, env, rows)
    return 0


if __name__ == "__main__":
    allocator("reuse")
    sys.exit(main())
