"""Train a GAT on a graph too large for full-batch training: sampled mini-batches, optionally over processes.

Training: each step takes a batch of seed (training) nodes, samples a fixed number of in-neighbours
per node and layer with DGL's ``NeighborSampler`` (``--fanouts``), and runs ``gatx.GATConv`` layers
on the sampled blocks. Evaluation is layer-wise full-neighbour inference: layer l is computed for
all nodes, ``--eval-batch-size`` nodes at a time, from layer l-1's outputs, so memory is bounded by
one batch's neighbourhood, not by the graph.

Data-parallel: launched by ``torchrun``, every process holds the graph, takes its shard of each
global batch of seeds (``--batch-size`` is the global batch), samples its own blocks, and
DistributedDataParallel averages the gradients (gloo on CPU, nccl on GPU).

    python examples/large_graph.py --tiny                          # small synthetic graph, < 1 min
    torchrun --standalone --nproc_per_node=2 examples/large_graph.py --tiny
    python examples/large_graph.py                                  # 1M nodes / 20M edges synthetic
    python examples/large_graph.py --dataset ogbn-arxiv --impl dgl  # dgl.nn.GATConv, same loop
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
        examples/large_graph.py --dataset ogbn-products             # several machines

Synthetic graphs come from ``gatx.data.synthetic.make_sbm``; OGB data from ``gatx.data.ogb``
(``--data-dir``, else $GATX_DATA_DIR, else the repository's datasets/ folder).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import gatx
from gatx.backends.dgl import import_dgl
from gatx.data import DataError
from gatx.data.ogb import load_ogb
from gatx.data.synthetic import edge_homophily, make_sbm

TINY = dict(nodes=3000, edges=40000, classes=5, features=32, train_frac=0.4, fanouts="5,5", batch_size=128,
            hidden=8, heads=4, lr=0.01, epochs=5, eval_batch_size=1024)


class SampledGAT(nn.Module):
    """GAT layers (ELU between, heads concatenated; one output head) over a list of sampled blocks."""

    def __init__(self, conv, in_feats: int, hidden: int, heads: int, classes: int, layers: int,
                 dropout: float, attn_drop: float, **conv_kwargs) -> None:
        super().__init__()
        widths = [in_feats] + [hidden * heads] * (layers - 1)
        self.layers = nn.ModuleList(
            conv(w, hidden if i < layers - 1 else classes, heads if i < layers - 1 else 1,
                 feat_drop=dropout if i > 0 else 0.0, attn_drop=attn_drop, **conv_kwargs)
            for i, w in enumerate(widths)
        )

    def apply_layer(self, i: int, block, h: Tensor) -> Tensor:
        out = self.layers[i](block, h)  # (N_dst, H, D)
        return F.elu(out.flatten(1)) if i < len(self.layers) - 1 else out.mean(1)

    def forward(self, blocks, x: Tensor) -> Tensor:
        h = x
        for i, block in enumerate(blocks):
            h = self.apply_layer(i, block, h)
        return h  # (N_seeds, C)


def build_model(args, in_feats: int, classes: int) -> nn.Module:
    if args.impl == "dgl":
        conv, kwargs = import_dgl().nn.GATConv, {}
    else:
        conv, kwargs = gatx.GATConv, {"backend": args.backend}
    return SampledGAT(conv, in_feats, args.hidden, args.heads, classes, len(args.fanout_list), args.dropout,
                      args.attn_drop, **kwargs)


def shard_seeds(train_idx: Tensor, batch_size: int, rank: int, world: int, seed: int, epoch: int) -> Tensor:
    """This process's seed nodes for one epoch, in order: global batch t of a seeded permutation is
    split into ``world`` equal parts and part ``rank`` is this process's batch t (a remainder of fewer
    than ``world`` seeds is dropped, so every process takes the same number of steps)."""
    gen = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = train_idx[torch.randperm(train_idx.numel(), generator=gen)]
    full = perm.numel() // batch_size
    local = batch_size // world
    head = perm[: full * batch_size].view(full, world, local)[:, rank].reshape(-1)
    tail = perm[full * batch_size :]
    tail = tail[: tail.numel() // world * world].view(world, -1)[rank]
    return torch.cat([head, tail])


def progress(iterable, total: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal; plain lines (start and end) otherwise."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False)
    return iterable


def train_epoch(model, opt, graph, feats: Tensor, labels: Tensor, seeds: Tensor, sampler, local_batch: int,
                device: torch.device, workers: int = 0, max_steps: int | None = None, show: bool = False) -> dict:
    """One pass over this process's seeds; returns the mean loss and the number of seeds trained on."""
    dgl = import_dgl()
    loader = dgl.dataloading.DataLoader(graph, seeds, sampler, batch_size=local_batch, shuffle=False,
                                        drop_last=False, num_workers=workers)
    model.train()
    total, count, steps = 0.0, 0, min(len(loader), max_steps or len(loader))
    for step, (input_nodes, output_nodes, blocks) in enumerate(progress(loader, steps, "train", show)):
        if step == steps:
            break
        blocks = [b.to(device) for b in blocks]
        logits = model(blocks, feats[input_nodes].to(device))
        loss = F.cross_entropy(logits, labels[output_nodes].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * output_nodes.numel()
        count += output_nodes.numel()
    return {"loss": total / max(count, 1), "seeds": count, "steps": steps}


@torch.no_grad()
def layerwise_inference(model: SampledGAT, graph, feats: Tensor, batch_size: int, device: torch.device,
                        rank: int = 0, world: int = 1, show: bool = False) -> Tensor:
    """Every node's logits with full neighbourhoods, one layer at a time (each process computes its
    share of the nodes per layer; an all-reduce assembles them)."""
    dgl = import_dgl()
    model.eval()
    sampler = dgl.dataloading.MultiLayerFullNeighborSampler(1)
    n = graph.num_nodes()
    mine = torch.arange(rank, n, world)
    h = feats
    for i in range(len(model.layers)):
        loader = dgl.dataloading.DataLoader(graph, mine, sampler, batch_size=batch_size, shuffle=False)
        out = None
        for input_nodes, output_nodes, (block,) in progress(loader, len(loader), f"infer layer {i}", show):
            y = model.apply_layer(i, block.to(device), h[input_nodes].to(device)).cpu()
            if out is None:
                out = torch.zeros(n, y.shape[1], dtype=y.dtype)
            out[output_nodes] = y
        if world > 1:  # rows are disjoint across processes: the sum assembles them (nccl needs device tensors)
            out = out.to(device)
            dist.all_reduce(out)
            out = out.cpu()
        h = out
    return h


def accuracy(logits: Tensor, labels: Tensor, idx: Tensor) -> float:
    return (logits[idx].argmax(1) == labels[idx]).float().mean().item()


def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; a process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def load_data(args):
    if args.dataset == "synthetic":
        return make_sbm(args.nodes, args.edges, args.classes, args.features, args.homophily,
                        split=(args.train_frac, 0.1), seed=args.data_seed)
    data = load_ogb(args.dataset, args.data_dir)
    return data


def dgl_graph(data):
    """The DGL graph the samplers walk: symmetrised (ogbn-arxiv is directed) with one self-loop per node."""
    dgl = import_dgl()
    g = dgl.graph((data.graph.src, data.graph.dst), num_nodes=data.num_nodes)
    if data.name == "ogbn-arxiv":
        g = dgl.to_bidirected(g)
    g = dgl.add_self_loop(dgl.remove_self_loop(g))
    return g.formats(["csc"])  # sampling walks in-edges only


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "ogbn-arxiv", "ogbn-products"])
    p.add_argument("--tiny", action="store_true", help="small synthetic graph and short schedule: "
                   + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in TINY.items()))
    p.add_argument("--nodes", type=int, default=1_000_000, help="synthetic: nodes")
    p.add_argument("--edges", type=int, default=20_000_000, help="synthetic: directed edges (2 per pair)")
    p.add_argument("--classes", type=int, default=10, help="synthetic: classes")
    p.add_argument("--features", type=int, default=128, help="synthetic: features per node")
    p.add_argument("--homophily", type=float, default=0.7, help="synthetic: edge homophily")
    p.add_argument("--train-frac", type=float, default=0.1, help="synthetic: training fraction (val: 0.1)")
    p.add_argument("--data-seed", type=int, default=0, help="synthetic: generator seed")
    p.add_argument("--data-dir", default=None, help="OGB data root (default $GATX_DATA_DIR or datasets/)")
    p.add_argument("--fanouts", default="10,10,10", help="sampled in-neighbours per layer, input layer first")
    p.add_argument("--batch-size", type=int, default=1024, help="global seed nodes per step (all processes)")
    p.add_argument("--eval-batch-size", type=int, default=4096, help="nodes per batch of layer-wise inference")
    p.add_argument("--hidden", type=int, default=32, help="features per head in hidden layers")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.2, help="input dropout of hidden layers")
    p.add_argument("--attn-drop", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations (0: only at the end)")
    p.add_argument("--impl", default="gatx", choices=["gatx", "dgl"], help="gatx.GATConv or dgl.nn.GATConv")
    p.add_argument("--backend", default=None, help="gatx backend (default: fastest usable)")
    p.add_argument("--workers", type=int, default=0, help="sampling worker processes per training process")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    try:
        args.fanout_list = [int(f) for f in args.fanouts.split(",")]
    except ValueError:
        p.error(f"--fanouts must be comma-separated ints such as 10,10,10, got {args.fanouts!r}")
    if not args.fanout_list or any(f == 0 or f < -1 for f in args.fanout_list):
        p.error(f"--fanouts must be positive ints (or -1 for all neighbours), got {args.fanouts!r}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    dgl = import_dgl()
    dgl.seed(args.seed * 1000 + rank)  # each process samples its own neighbourhoods
    start = time.perf_counter()
    data = load_data(args)
    g = dgl_graph(data)
    say(f"{data!r} | homophily {edge_homophily(data.graph, data.labels):.3f} | built in {time.perf_counter() - start:.1f}s")
    model = build_model(args, data.features.shape[1], data.num_classes).to(device)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    net = model.module if world > 1 else model
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sampler = dgl.dataloading.NeighborSampler(args.fanout_list)
    say(f"{args.impl} | {len(args.fanout_list)} layers x {args.heads} heads x {args.hidden} | fanouts {args.fanouts} | "
        f"batch {args.batch_size} = {world} x {args.batch_size // world} | {device}")
    history, best = [], (-1.0, 0.0)
    for epoch in range(1, args.epochs + 1):
        seeds = shard_seeds(data.train_idx, args.batch_size, rank, world, args.seed, epoch)
        t0 = time.perf_counter()
        stats = train_epoch(model, opt, g, data.features, data.labels, seeds, sampler, args.batch_size // world,
                            device, args.workers, args.max_steps, show=rank == 0)
        seconds = time.perf_counter() - t0
        if world > 1:  # the loss over all processes' seeds
            both = torch.tensor([stats["loss"] * stats["seeds"], stats["seeds"]], dtype=torch.float64, device=device)
            dist.all_reduce(both)
            stats["loss"] = (both[0] / both[1]).item()
        line = f"epoch {epoch:3d} | loss {stats['loss']:.4f} | {seconds:.1f}s | {stats['seeds'] * world / seconds:.0f} seeds/s"
        row = {"epoch": epoch, "seconds": seconds, **stats}
        if epoch == args.epochs or (args.eval_every and epoch % args.eval_every == 0):
            logits = layerwise_inference(net, g, data.features, args.eval_batch_size, device, rank, world, rank == 0)
            row["val_acc"], row["test_acc"] = accuracy(logits, data.labels, data.val_idx), accuracy(logits, data.labels, data.test_idx)
            best = max(best, (row["val_acc"], row["test_acc"]))
            line += f" | val {100 * row['val_acc']:.2f}% | test {100 * row['test_acc']:.2f}%"
        say(line, flush=True)
        history.append(row)
    final = history[-1]
    say(f"final test accuracy: {100 * final['test_acc']:.2f}% (val {100 * final['val_acc']:.2f}%; chance "
        f"{100 / data.num_classes:.1f}%; best val {100 * best[0]:.2f}% -> test {100 * best[1]:.2f}%)")
    if world > 1:
        dist.destroy_process_group()
    return {"history": history, "test_acc": final["test_acc"], "val_acc": final["val_acc"], "world": world}


def cli() -> int:
    warnings.filterwarnings("ignore", message=".*(graphbolt|CPU affinity).*")
    try:
        main()
    except (DataError, ValueError, ImportError) as err:
        print(f"large_graph.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
