"""Large-graph GAT training: sampled mini-batches (gatx vs dgl.nn.GATConv, same loop) and the full-batch question.

Graph: ``gatx.data.synthetic.make_sbm`` (default 1M nodes, 20M directed edges, 128 features, 10
classes, homophily 0.7, heavy-tailed degrees) plus one self-loop per node. Model: the example's
``SampledGAT`` (examples/large_graph.py): 3 layers, 8 heads x 32 features, one output head.

1. Sampled training, the example's loop (DGL ``NeighborSampler`` + ``DataLoader``, fanouts 10,10,10,
   batch 1024, Adam): after ``--warmup`` batches, ``--batches`` timed batches per system with the
   same seeds and samples. Throughput = seed nodes / wall time (sampling, feature gather, forward,
   backward, step); the sampling share is timed separately. Peak memory = peak resident set size
   during two untimed batches after the warm-up minus the resident size before them
   (``_harness.peak_memory``, the allocator in its memory setting).
2. Full batch: one training step (forward over the whole graph, backward, Adam) of the same 3-layer
   8-head GAT on gatx, DGL and PyG (``torch_geometric.nn.GATConv``). Each is first measured at two
   small scales (1% and 2% of the nodes and edges) and its memory and step time extrapolated
   linearly (both grow linearly in nodes and edges); the systems in ``--full-scale`` then run one
   step at full scale, but only when the prediction fits in ``--mem-budget-gib`` and in the memory
   the machine has free at that moment; other rows give the prediction and say why.

Results go to a scratch folder (``$TMPDIR/gatx-bench-large``) unless ``--update-results`` writes
benchmarks/results/large.{json,md}. ``--quick`` runs a 20k-node graph in a few minutes.

    nice -n 10 python benchmarks/bench_large.py --quick
    nice -n 10 python benchmarks/bench_large.py --batches 30 --update-results
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _harness import environment, peak_memory, load_average, log, quiet_import_dgl, allocator

REPO = Path(__file__).resolve().parents[1]
PROBES = (0.01, 0.02)  # full-batch probe scales (fractions of the nodes and edges)
RESULTS = REPO / "benchmarks" / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20k nodes / 400k edges, 8 batches, full batch at that scale")
    p.add_argument("--nodes", type=int, default=1_000_000)
    p.add_argument("--edges", type=int, default=20_000_000, help="directed edges (before self-loops)")
    p.add_argument("--features", type=int, default=128)
    p.add_argument("--fanouts", default="10,10,10")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=32, help="features per head")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="untimed batches per system")
    p.add_argument("--batches", type=int, default=30, help="timed batches per system")
    p.add_argument("--systems", default="gatx,dgl", help="sampled-training systems: gatx, dgl, and gatx-project-first "
                   "(gatx with GATConv's aggregate-first path off, to see what it buys)")
    p.add_argument("--full-batch", default="gatx,dgl,pyg", help="full-batch systems ('' to skip)")
    p.add_argument("--full-scale", default="gatx", help="full-batch systems also run at full scale when they fit")
    p.add_argument("--mem-budget-gib", type=float, default=20.0, help="largest full-batch prediction to run")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=None, help="result folder (default: $TMPDIR/gatx-bench-large)")
    p.add_argument("--update-results", action="store_true", help="write benchmarks/results/large.{json,md}")
    args = p.parse_args(argv)
    if args.quick:
        args.nodes, args.edges, args.batches, args.warmup = 20_000, 400_000, 8, 2
    return args


def load_example():
    spec = importlib.util.spec_from_file_location("large_graph_example", REPO / "examples" / "large_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_args(ex, args, impl: str):
    return ex.parse_args(["--impl", impl, "--fanouts", args.fanouts, "--hidden", str(args.hidden), "--heads",
                          str(args.heads), "--dropout", "0", "--lr", "0.003"])


# ---------------------------------------------------------------------------------- sampled training
def sampled_row(ex, args, data, g, system: str) -> dict:
    """One system's sampled-training row; ``gatx-project-first`` is gatx with GATConv's aggregate-first
    path turned off (every layer projects its src rows first, as before that path existed)."""
    import gatx.nn.gatconv as gatconv

    gatconv.AGGREGATE_FIRST = False if system == "gatx-project-first" else None
    try:
        return _sampled_row(ex, args, data, g, "gatx" if system == "gatx-project-first" else system) | {"system": system}
    finally:
        gatconv.AGGREGATE_FIRST = None


def _sampled_row(ex, args, data, g, impl: str) -> dict:
    import torch
    import torch.nn.functional as F

    dgl = quiet_import_dgl()
    torch.manual_seed(0)
    dgl.seed(0)  # the same samples for every system
    model = ex.build_model(model_args(ex, args, impl), data.features.shape[1], data.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sampler = dgl.dataloading.NeighborSampler([int(f) for f in args.fanouts.split(",")])
    per_epoch = data.train_idx.numel() // args.batch_size  # full batches; as many epochs as needed
    if per_epoch == 0:
        raise ValueError(f"{data.train_idx.numel()} training nodes make no batch of {args.batch_size}")
    epochs = -(-(args.warmup + 2 + args.batches) // per_epoch)  # 2: the memory phase's batches
    seeds = torch.cat([ex.shard_seeds(data.train_idx, args.batch_size, 0, 1, seed=0, epoch=e)[: per_epoch * args.batch_size]
                       for e in range(epochs)])  # no batch straddles two epochs (no duplicate seeds)
    loader = iter(dgl.dataloading.DataLoader(g, seeds, sampler, batch_size=args.batch_size, shuffle=False))

    def step(timings: list | None) -> int:
        t0 = time.perf_counter()
        input_nodes, output_nodes, blocks = next(loader)
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(blocks, data.features[input_nodes]), data.labels[output_nodes])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if timings is not None:
            timings.append((t1 - t0, time.perf_counter() - t1, sum(b.num_edges() for b in blocks)))
        return output_nodes.numel()

    model.train()
    for _ in range(args.warmup):
        step(None)
    mem = peak_memory(lambda: step(None), "cpu")  # two batches in a memory phase, never timed
    timings: list = []
    t0 = time.perf_counter()
    seen = sum(step(timings) for _ in range(args.batches))
    wall = time.perf_counter() - t0
    sample_s = sum(t[0] for t in timings)
    return {
        "phase": "sampled", "system": impl, "status": "ok", "seeds_per_s": seen / wall, "wall_s": wall,
        "batches": args.batches, "sample_share": sample_s / wall, "compute_s_per_batch": statistics.median(t[1] for t in timings),
        "sample_s_per_batch": statistics.median(t[0] for t in timings), "edges_per_batch": statistics.median(t[2] for t in timings),
        "peak_mem_mib": mem.mib, "mem_method": mem.method, "load_avg_1min": load_average(),
        "compute_s": [round(t[1], 3) for t in timings], "sample_s": [round(t[0], 3) for t in timings],
    }


# ---------------------------------------------------------------------------------- full batch
def full_batch_step(system: str, ex, args, data, src, dst):
    """One full-graph training step of the 3-layer model on ``system``; returns a closure."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    n, f, c = data.num_nodes, data.features.shape[1], data.num_classes
    if system == "pyg":
        from torch_geometric.nn import GATConv as PygGAT

        edge_index = torch.stack([src, dst])
        layers = torch.nn.ModuleList([PygGAT(f, args.hidden, args.heads, add_self_loops=False),
                                      PygGAT(args.hidden * args.heads, args.hidden, args.heads, add_self_loops=False),
                                      PygGAT(args.hidden * args.heads, c, 1, add_self_loops=False)])

        def forward():
            h = data.features
            for i, layer in enumerate(layers):
                h = layer(h, edge_index)
                h = F.elu(h) if i < 2 else h
            return h
        params = layers.parameters()
    else:
        import gatx

        model = ex.build_model(model_args(ex, args, system), f, c)
        graph = gatx.Graph(src, dst, n, n) if system == "gatx" else quiet_import_dgl().graph((src, dst), num_nodes=n)
        blocks = [graph] * 3

        def forward():
            return model(blocks, data.features)
        params = model.parameters()
    opt = torch.optim.Adam(params, lr=3e-3)
    train = data.train_idx

    def step():
        loss = F.cross_entropy(forward()[train], data.labels[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def full_batch_row(system: str, ex, args, data, src, dst, epochs: int) -> dict:
    times = []

    def build_and_run() -> None:  # the memory phase: building the model and its first epoch
        nonlocal step
        step = full_batch_step(system, ex, args, data, src, dst)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)  # first_epoch_s (allocator in its memory setting)

    step = None
    mem = peak_memory(build_and_run, "cpu", calls=1)
    for _ in range(epochs):  # timed epochs after the first
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    del step
    gc.collect()
    return {"phase": "full", "system": system, "status": "ok", "nodes": data.num_nodes, "edges": int(src.numel()),
            "epoch_s": times[-1], "first_epoch_s": times[0], "peak_mem_mib": mem.mib, "load_avg_1min": load_average()}


def with_loops(data):
    import torch

    loop = torch.arange(data.num_nodes)
    return torch.cat([data.graph.src, loop]), torch.cat([data.graph.dst, loop])


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 2**20


def full_batch_rows(ex, args, data, make) -> list[dict]:
    systems = [s for s in args.full_batch.split(",") if s]
    if not systems:
        return []
    if args.quick:
        src, dst = with_loops(data)
        return [full_batch_row(s, ex, args, data, src, dst, 2) for s in systems]
    probes = {}
    for scale in PROBES:  # memory and time at two smaller scales: predict the full size linearly
        small = make(int(args.nodes * scale), int(args.edges * scale) // 2 * 2)
        src, dst = with_loops(small)
        probes[scale] = {s: full_batch_row(s, ex, args, small, src, dst, 1) for s in systems}
        del small, src, dst
        gc.collect()
    rows = []
    src, dst = with_loops(data)
    for system in systems:
        (s1, r1), (s2, r2) = ((s, probes[s][system]) for s in PROBES)
        slope = (r2["peak_mem_mib"] - r1["peak_mem_mib"]) / (s2 - s1)
        predicted = (r2["peak_mem_mib"] + slope * (1.0 - s2)) / 1024
        t_slope = (r2["epoch_s"] - r1["epoch_s"]) / (s2 - s1)
        extra = {"predicted_gib": round(predicted, 2), "predicted_epoch_s": round(r2["epoch_s"] + t_slope * (1.0 - s2), 1),
                 "probe_mib": {str(s1): round(r1["peak_mem_mib"]), str(s2): round(r2["peak_mem_mib"])}}
        free = mem_available_gib()
        if system not in args.full_scale.split(","):
            rows.append({"phase": "full", "system": system, "status": "predicted", "nodes": args.nodes,
                         "edges": int(src.numel()), **extra, "reason": "not in --full-scale (time on a shared machine)"})
        elif predicted > min(args.mem_budget_gib, 0.8 * free):
            rows.append({"phase": "full", "system": system, "status": "not run", "nodes": args.nodes,
                         "edges": int(src.numel()), **extra,
                         "reason": f"predicted peak {predicted:.1f} GiB exceeds the budget {args.mem_budget_gib:g} GiB "
                                   f"or 80% of the {free:.1f} GiB free on this shared machine"})
        else:
            rows.append({**full_batch_row(system, ex, args, data, src, dst, 1), **extra})
        log(json.dumps(rows[-1]))
    return rows


# ---------------------------------------------------------------------------------- report
def markdown(env: dict, rows: list[dict], args) -> str:
    lines = [f"# Large-graph GAT ({args.nodes:,} nodes, {args.edges:,} edges + self-loops, {args.features} features)", "",
             f"{env['device']}, {env['threads']} thread(s), torch {env['torch']}, dgl {env['dgl']}, "
             f"torch_geometric {env['torch_geometric']}; load average {env['load_avg_1min']} at the start", "",
             f"## Sampled training (fanouts {args.fanouts}, batch {args.batch_size}, 3 layers x {args.heads} heads x "
             f"{args.hidden}, {args.batches} timed batches)", "",
             "| system | seeds/s | s/batch compute | s/batch sampling | sampling share | peak MiB | load |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["phase"] == "sampled":
            lines.append(f"| {r['system']} | {r['seeds_per_s']:.0f} | {r['compute_s_per_batch']:.2f} | {r['sample_s_per_batch']:.2f} | "
                         f"{100 * r['sample_share']:.0f}% | {r['peak_mem_mib']:.0f} | {r['load_avg_1min']} |")
    sampled = {r["system"]: r for r in rows if r["phase"] == "sampled"}
    for name in ("gatx", "gatx-project-first"):
        if {name, "dgl"} <= sampled.keys():
            g, d = sampled[name], sampled["dgl"]
            lines += ["", f"{name} / DGL: throughput {g['seeds_per_s'] / d['seeds_per_s']:.2f}x, compute per batch "
                          f"{d['compute_s_per_batch'] / g['compute_s_per_batch']:.2f}x faster, peak memory "
                          f"{g['peak_mem_mib'] / max(d['peak_mem_mib'], 1e-9):.2f}x"]
    lines += ["", "## Full batch (one training step = one epoch)", "",
              "| system | nodes | edges | status | epoch s | peak GiB | predicted GiB | note |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["phase"] == "full":
            ok = r["status"] == "ok"
            lines.append(f"| {r['system']} | {r['nodes']:,} | {r['edges']:,} | {r['status']} | "
                         f"{r['epoch_s']:.1f} | {r['peak_mem_mib'] / 1024:.2f} | " if ok else
                         f"| {r['system']} | {r['nodes']:,} | {r['edges']:,} | {r['status']} | "
                         f"~{r['predicted_epoch_s']} | - | ")
            lines[-1] += f"{r.get('predicted_gib', '-')} | {r.get('reason', '')} |"
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    allocator("reuse")
    import torch

    torch.set_num_threads(args.threads)
    from gatx.data.synthetic import make_sbm

    ex = load_example()

    def make(n, e):
        return make_sbm(n, e, num_classes=10, num_features=args.features, homophily=0.7, seed=0)

    env = environment("cpu")
    log(f"load average {env['load_avg_1min']}; building {args.nodes:,} nodes / {args.edges:,} edges")
    t0 = time.perf_counter()
    data = make(args.nodes, args.edges)
    g = ex.dgl_graph(data)
    env["build_s"] = round(time.perf_counter() - t0, 1)
    log(f"{data!r} built in {env['build_s']}s")
    rows = []
    for system in [s for s in args.systems.split(",") if s]:
        rows.append(sampled_row(ex, args, data, g, system))
        log(json.dumps(rows[-1]))
    del g
    rows += full_batch_rows(ex, args, data, make)
    out = RESULTS if args.update_results else Path(args.out or Path(tempfile.gettempdir()) / "gatx-bench-large")
    out.mkdir(parents=True, exist_ok=True)
    name = "large_quick" if args.quick else "large"
    (out / f"{name}.json").write_text(json.dumps({"env": env, "args": vars(args), "rows": rows}, indent=1))
    (out / f"{name}.md").write_text(markdown(env, rows, args))
    print(markdown(env, rows, args))
    log(f"wrote {out / name}.json and .md")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
