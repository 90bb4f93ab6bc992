"""Benchmark one GAT layer (8 heads x 8 features): gatx on each backend, DGL, PyG and a dense masked GAT.

Graphs: Cora (from ``gatx.data.load_planetoid``) and seeded random graphs (average in-degree 20 plus a
self-loop per node, duplicate edges removed, edges sorted by destination). Every system gets the same
weights (gatx's layer, copied) and inputs; its output and parameter gradients are compared with
gatx's reference (the ``torch`` backend) before it is timed, and a system that disagrees is reported
as a mismatch and not timed. ``fwd`` is timed under ``torch.no_grad()``; ``fwd+bwd`` is one forward
and a backward of a fixed random output gradient into the layer's parameters (the input features do
not require gradients, as in a first layer).

Every timed row also shows how far it is from the machine's limit (``x_of_limit``), under this model
(:func:`traffic`; float32, 64-byte cache lines, int64 indices):

    limit = minimum bytes / copy bandwidth + projection flops / GEMM rate

where the copy bandwidth (GB/s, a 256 MiB tensor copy, bytes read + written) and the GEMM rate
(GFLOP/s of the case's own ``(N, F) @ (F, H*D)`` product) are measured at the start of the run with
the same thread count. The minimum bytes are what any implementation of the layer must move: for
each pass over the edges the gathered rows of the other endpoint (each rounded up to whole cache
lines) and the index arrays, plus every node-sized tensor read or written once; the projection
counts only x's nonzeros (flops 2 nnz(x) H D per product: Cora's features are 1.3% nonzero).

    python benchmarks/bench_gat.py --quick --json gat.json
    python benchmarks/bench_gat.py --sizes 10000,100000,300000 --in-feats 128 --no-cora
    python benchmarks/bench_gat.py --device cuda
"""
from __future__ import annotations

import argparse
import gc
import sys
from typing import Any, Callable

from _harness import (HelpFormatter, Skip, check_and_time, copy_bandwidth, cuda_missing, environment, fwd_bwd, gemm_rate, log,
                      progress, pyg_gat, quiet_import_dgl, allocator, write_json)

HEADS, OUT_FEATS, AVG_DEGREE = 8, 8, 20
FULL_SIZES = [32, 100, 300, 1000, 3000, 10000, 30000, 100000, 300000]
QUICK_SIZES = [32, 100, 1000, 10000, 30000]
TINY_SIZES = [64, 256]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU sizes for a run of about a minute")
    p.add_argument("--tiny", action="store_true", help="a few seconds: tiny sizes, 2 repetitions (for tests)")
    p.add_argument("--sizes", type=str, default=None, help="comma-separated random-graph node counts")
    p.add_argument("--in-feats", type=int, default=128, help="input width of the random graphs (default 128)")
    p.add_argument("--no-cora", action="store_true", help="skip the Cora case")
    p.add_argument("--data-dir", type=str, default=None, help="dataset root for Cora (default: the loader's default)")
    p.add_argument("--device", type=str, default="cpu", help="cpu or cuda")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    p.add_argument("--reps", type=int, default=None, help="timed calls (the median is reported)")
    p.add_argument("--budget", type=float, default=None, help="seconds per timing phase before stopping early (>= 3 reps)")
    p.add_argument("--dense-max-nodes", type=int, default=None,
                   help="largest N for the dense masked GAT (default 4000: H*N^2 floats, ~5 live copies in fwd+bwd)")
    p.add_argument("--tol", type=float, default=1e-3, help="largest relative difference to gatx accepted before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=str, default=None, help="write {env, rows} here (default: stdout)")
    args = p.parse_args(argv)
    if args.tiny:
        sizes, warmup, reps, budget, dense = TINY_SIZES, 1, 1, 0.5, 1000
    elif args.quick:
        sizes, warmup, reps, budget, dense = QUICK_SIZES, 1, 5, 1.0, 3000
    else:
        sizes, warmup, reps, budget, dense = FULL_SIZES, 2, 10, 10.0, 4000
    args.sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else sizes
    args.warmup = warmup if args.warmup is None else args.warmup
    args.reps = reps if args.reps is None else args.reps
    args.budget = budget if args.budget is None else args.budget
    args.dense_max_nodes = dense if args.dense_max_nodes is None else args.dense_max_nodes
    return args


# ---------------------------------------------------------------------------------- graphs
def clean_edges(src: Any, dst: Any, n: int) -> tuple[Any, Any]:
    """Remove duplicate edges and self-loops, add one self-loop per node; edges sorted by dst."""
    import torch

    key = torch.unique(dst.long() * n + src.long())  # sorted by (dst, src), duplicates gone
    s, d = key % n, key // n
    keep = s != d
    loops = torch.arange(n)
    d = torch.cat([d[keep], loops])
    s = torch.cat([s[keep], loops])
    order = torch.argsort(d, stable=True)
    return s[order], d[order]


def random_case(n: int, in_feats: int, seed: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed + n)
    e = n * AVG_DEGREE
    src = torch.randint(0, n, (e,), generator=gen)
    dst = torch.randint(0, n, (e,), generator=gen)
    src, dst = clean_edges(src, dst, n)
    feat = torch.randn(n, in_feats, generator=gen)
    return {"case": f"random-{n}", "graph": "random", "src": src, "dst": dst, "feat": feat}


def cora_case(data_dir: str | None) -> dict[str, Any]:
    import torch

    try:
        from gatx.data import load_planetoid
    except ImportError as err:
        raise Skip(f"gatx.data.load_planetoid is not available yet ({err})") from err
    try:
        ds = load_planetoid("cora", root=data_dir) if data_dir else load_planetoid("cora")
    except Exception as err:  # noqa: BLE001 - missing files, checksum failure: reported as the reason
        raise Skip(f"Cora could not be loaded: {type(err).__name__}: {err}") from err
    feat = ds.features.to_dense() if ds.features.layout != torch.strided else ds.features  # raw bag of words
    n = feat.shape[0]
    src, dst = clean_edges(ds.graph.src, ds.graph.dst, n)
    return {"case": "cora", "graph": "cora", "src": src, "dst": dst, "feat": feat.float().contiguous()}


# ---------------------------------------------------------------------------------- roofline
LINE, INDEX, FLOAT = 64, 8, 4  # cache line, index and value bytes


def _lines(nbytes: int) -> int:
    return -(-nbytes // LINE) * LINE


def traffic(n: int, e: int, in_feats: int, heads: int = HEADS, out_feats: int = OUT_FEATS,
            nnz: int | None = None) -> dict[str, tuple[float, float]]:
    """{mode: (minimum bytes, flops)} of one GAT layer on N nodes, E edges, F inputs, H heads of D.

    x counts as the smaller of its dense size (N F values) and its ``nnz`` nonzeros as CSR (a value and
    an int32 column each, plus row offsets), and the projection's flops as 2 nnz HD: a layer that
    skips the zeros of bag-of-words features (Cora: 1.3% nonzero) needs no more.

    fwd: the projection reads x and writes feat (N HD); the score terms read feat and write
    el, er (N H each); the edge pass reads its CSR (indptr, one index per edge), gathers per edge the
    source's value row (HD) and score term (H), reads er and writes out (N HD) and the row
    statistics (N H). Flops: the projection, 2 N F HD.

    fwd+bwd adds a second edge pass (the transposed graph's indices, and per edge the destination's
    output-gradient row (HD), score term (H) and row statistics (2H) gathered), the dense reads of the
    output gradient and the output (N HD each, for the per-row term of the softmax gradient), the
    writes of the value, el and er gradients (N HD + 2 N H), and the weight gradient's GEMM (reads
    the feature gradient (N HD) and x; 2 nnz HD more flops).
    """
    hd, s = heads * out_feats, FLOAT
    nnz = n * in_feats if nnz is None else nnz
    x_bytes = min(n * in_feats * s, nnz * (s + 4) + (n + 1) * INDEX)
    index = (n + 1) * INDEX + e * INDEX
    fwd = (x_bytes + n * hd * s  # projection
           + n * hd * s + 2 * n * heads * s  # el, er
           + index + e * (_lines(hd * s) + _lines(heads * s)) + n * heads * s + n * hd * s + n * heads * s)
    bwd = (index + e * (_lines(hd * s) + _lines(heads * s) + _lines(2 * heads * s))
           + 2 * n * hd * s + n * hd * s + 2 * n * heads * s  # g and out read; dv, del, der written
           + n * hd * s + x_bytes)  # the weight gradient's GEMM
    flops = 2.0 * nnz * hd
    return {"fwd": (float(fwd), flops), "fwd+bwd": (float(fwd + bwd), 2 * flops)}


# ---------------------------------------------------------------------------------- systems
# Each builder returns (forward, params): forward() -> (N, H, D) output; params: {gatx parameter name:
# the system's own parameter holding that weight}, so gradients can be compared name by name.
Builder = Callable[[dict[str, Any]], tuple[Callable[[], Any], dict[str, Any]]]


def _gatx_builder(backend: str) -> Builder:
    def build(c: dict[str, Any]):
        import gatx

        layer = gatx.GATConv(c["in_feats"], OUT_FEATS, HEADS, backend=backend).to(c["device"])
        layer.load_state_dict(c["state"])
        graph = c["gatx_graph"]
        return (lambda: layer(graph, c["feat"])), dict(layer.named_parameters())

    return build


def _dgl_builder(c: dict[str, Any]):
    try:
        dgl = quiet_import_dgl()
    except ImportError as err:
        raise Skip(str(err)) from err
    layer = dgl.nn.pytorch.GATConv(c["in_feats"], OUT_FEATS, HEADS).to(c["device"])
    layer.load_state_dict(c["state"])
    g = dgl.graph((c["src"], c["dst"]), num_nodes=c["n"]).to(c["device"])
    return (lambda: layer(g, c["feat"])), dict(layer.named_parameters())


def _pyg_builder(c: dict[str, Any]):
    import torch

    layer, params = pyg_gat(c["in_feats"], OUT_FEATS, HEADS, c["state"], c["device"])
    edge_index = torch.stack([c["src"], c["dst"]]).to(c["device"])
    n = c["n"]
    return (lambda: layer(c["feat"], edge_index).view(n, HEADS, OUT_FEATS)), params


def _dense_builder(c: dict[str, Any]):
    import torch
    import torch.nn.functional as F
    from torch import nn

    n = c["n"]
    if n > c["dense_max_nodes"]:
        gib = HEADS * n * n * 4 / 2**30
        raise Skip(f"N={n} > --dense-max-nodes={c['dense_max_nodes']} (one H x N x N score matrix is {gib:.1f} GiB)")

    class DenseGAT(nn.Module):
        """GAT on a dense boolean adjacency: H x N x N scores, -inf off the graph, softmax, matmul."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(c["in_feats"], HEADS * OUT_FEATS, bias=False)
            self.attn_l = nn.Parameter(torch.empty(1, HEADS, OUT_FEATS))
            self.attn_r = nn.Parameter(torch.empty(1, HEADS, OUT_FEATS))
            self.bias = nn.Parameter(torch.empty(HEADS * OUT_FEATS))

        def forward(self, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x).view(-1, HEADS, OUT_FEATS)  # (N, H, D)
            el = (h * self.attn_l).sum(-1).t()  # (H, N) source terms
            er = (h * self.attn_r).sum(-1).t()  # (H, N) destination terms
            s = F.leaky_relu(er.unsqueeze(2) + el.unsqueeze(1), 0.2)  # (H, N_dst, N_src)
            s = s.masked_fill(~adj, float("-inf"))
            a = torch.softmax(s, dim=-1)  # (H, N_dst, N_src)
            out = torch.bmm(a, h.transpose(0, 1))  # (H, N, D)
            return out.transpose(0, 1) + self.bias.view(1, HEADS, OUT_FEATS)  # (N, H, D)

    layer = DenseGAT().to(c["device"])
    layer.load_state_dict(c["state"])
    adj = torch.zeros(n, n, dtype=torch.bool, device=c["device"])
    adj[c["dst"], c["src"]] = True  # adj[i, j]: edge j -> i
    return (lambda: layer(adj, c["feat"])), dict(layer.named_parameters())


def systems() -> list[tuple[str, str, Builder]]:
    """(system name, backend that runs it, builder) in table order."""
    import gatx

    out = [(f"gatx[{b}]", b, _gatx_builder(b)) for b in gatx.ops.BACKENDS]
    out += [("dgl.GATConv", "dgl", _dgl_builder), ("pyg.GATConv", "pyg", _pyg_builder), ("dense-masked", "torch-dense", _dense_builder)]
    return out


# ---------------------------------------------------------------------------------- running
def run_case(case: dict[str, Any], args: argparse.Namespace, env: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of every system on one case, each with its distance to the limit (:func:`traffic`)."""
    import torch

    import gatx

    dev = args.device
    src, dst = case["src"].to(dev), case["dst"].to(dev)
    feat = case["feat"].to(dev)
    n, in_feats = feat.shape
    torch.manual_seed(args.seed)
    ref_layer = gatx.GATConv(in_feats, OUT_FEATS, HEADS, backend="torch").to(dev)
    gen = torch.Generator().manual_seed(args.seed + 1)
    gout = torch.randn(n, HEADS, OUT_FEATS, generator=gen).to(dev)
    c = {
        "n": n, "in_feats": in_feats, "device": dev, "src": src, "dst": dst, "feat": feat,
        "state": {k: v.detach().clone() for k, v in ref_layer.state_dict().items()},
        "gatx_graph": gatx.Graph(src, dst, n, n), "dense_max_nodes": args.dense_max_nodes,
    }
    out = fwd_bwd(lambda: ref_layer(c["gatx_graph"], feat), gout, list(ref_layer.parameters()))
    ref = {"out": out.detach()} | {k: p.grad.detach().clone() for k, p in ref_layer.named_parameters()}
    del ref_layer, out
    base = {"bench": "gat", "case": case["case"], "graph": case["graph"], "nodes": n, "edges": int(src.numel()),
            "in_feats": in_feats, "heads": HEADS, "out_feats": OUT_FEATS, "device": env["device"],
            "threads": env["threads"], "reference": "gatx[torch]"}
    model = traffic(n, int(src.numel()), in_feats, nnz=int(torch.count_nonzero(feat)))
    rates = (env["copy_gbps"], gemm_rate(n, in_feats, HEADS * OUT_FEATS, dev))
    log(f"{case['case']}: N={n} E={src.numel()} in_feats={in_feats}; limit = bytes / {rates[0]:.1f} GB/s + flops / "
        f"{rates[1]:.1f} GFLOP/s: fwd {model['fwd'][0] / 1e6:.0f} MB + {model['fwd'][1] / 1e9:.2f} GFLOP, fwd+bwd "
        f"{model['fwd+bwd'][0] / 1e6:.0f} MB + {model['fwd+bwd'][1] / 1e9:.2f} GFLOP")
    return [row for name, backend, build in systems()
            for row in check_and_time(dict(base, system=name, backend=backend), lambda b=build: b(c), ref, gout, args,
                                      model=model, rates=rates)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if cuda_missing(args.device):
        return 2
    env = environment(args.device)
    env["copy_gbps"] = round(copy_bandwidth(args.device), 2)  # the roofline's bandwidth, measured in this run
    log(f"bench_gat on {env['device']}, {env['threads']} threads, torch {env['torch']}, dgl {env['dgl']}, "
        f"torch_geometric {env['torch_geometric']}")
    cases: list[Callable[[], dict[str, Any]]] = []
    weights: list[float] = []  # for the ETA: cost taken as proportional to N x input width
    rows: list[dict[str, Any]] = []
    if not args.no_cora:
        cases.append(lambda: cora_case(args.data_dir))
        weights.append(2708 * 1433 / args.in_feats)
    for n in args.sizes:
        cases.append(lambda n=n: random_case(n, args.in_feats, args.seed))
        weights.append(n)
    for make in progress(cases, weights, "bench_gat case"):
        try:
            case = make()
        except Skip as err:
            rows.append({"bench": "gat", "case": "cora", "graph": "cora", "system": "*", "mode": "*",
                         "status": "skipped", "reason": str(err), "device": env["device"]})
            log(f"cora: skipped: {err}")
            continue
        rows += run_case(case, args, env)
        del case
        gc.collect()
    write_json(args.json, env, rows)
    return 0


if __name__ == "__main__":
    allocator("reuse")
    sys.exit(main())
