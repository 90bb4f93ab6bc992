"""Patch-graph image classification on MNIST: the same sparse attention kernel, on images.

Each 28x28 image is cut into 4x4-pixel patches, giving a 7x7 grid of nodes. Attention layers run over
the patch graph: gatx.GATConv over the grid neighbourhood graph (optionally plus a k-nearest-neighbour
graph in feature space, as in Vision GNN), or gatx.vision.NeighborhoodAttention2d. Both call
gatx.ops.sparse_attention. A classifier head reads the mean of the node states.

    python examples/patch_graph.py                 # MNIST train (60k) -> test (10k), downloads if needed
    python examples/patch_graph.py --holdout       # only the 10k test split: train 8,000 / test 2,000

It saves a PNG with the attention weights of one patch drawn over some test images (``--plot``; default
``runs/patch_graph/attention-<time>.png`` in the repository, git-ignored). Progress: a bar with an ETA
over all training steps when stderr is a terminal, and a plain line every quarter epoch.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gatx
from gatx.data import DataError, load_mnist
from gatx.vision import NeighborhoodAttention2d, neighborhood_graph

REPO = Path(__file__).resolve().parents[1]


def batch_graph(graph: gatx.Graph, batch: int) -> gatx.Graph:
    """The disjoint union of `batch` copies of a per-image graph (node b*n + i is patch i of image b)."""
    n, e = graph.num_dst, graph.num_edges
    offset = (torch.arange(batch) * n).repeat_interleave(e)  # (B*E,)
    return gatx.Graph(graph.src.repeat(batch) + offset, graph.dst.repeat(batch) + offset, batch * n, batch * n)


def knn_graph(h: Tensor, k: int) -> gatx.Graph:
    """Per image, each patch attends to its k nearest patches in feature space (itself included)."""
    B, N, _ = h.shape
    with torch.no_grad():
        nearest = torch.cdist(h, h).topk(k, largest=False).indices  # (B, N, k) keys of each query
    src = (nearest + (torch.arange(B) * N).view(B, 1, 1)).flatten()
    dst = torch.arange(B * N).repeat_interleave(k)
    return gatx.Graph(src, dst, B * N, B * N)


class Block(nn.Module):
    """Pre-norm attention over the patch graph, then an MLP; both residual."""

    def __init__(self, dim: int, heads: int, attention: str, kernel: int, knn: int) -> None:
        super().__init__()
        self.attention, self.knn = attention, knn
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        if attention == "gat":
            self.attn = gatx.GATConv(dim, dim // heads, heads)
            self.attn_knn = gatx.GATConv(dim, dim // heads, heads) if knn else None
        else:
            self.attn = NeighborhoodAttention2d(dim, heads, kernel)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, graph: gatx.Graph | None, side: int) -> tuple[Tensor, Tensor | None]:
        B, N, C = x.shape
        h = self.norm1(x)
        att = None
        if self.attention == "gat":
            out, att = self.attn(graph, h.reshape(B * N, C), get_attention=True)  # (B*N, H, C/H), (E, H, 1)
            out = out.reshape(B, N, C)
            if self.attn_knn is not None:
                out = out + self.attn_knn(knn_graph(h, self.knn), h.reshape(B * N, C)).reshape(B, N, C)
        else:
            out = self.attn(h.reshape(B, side, side, C)).reshape(B, N, C)
        x = x + self.proj(out)
        return x + self.mlp(self.norm2(x)), att


class PatchGraphNet(nn.Module):
    def __init__(self, patch: int, dim: int, heads: int, depth: int, attention: str, kernel: int, knn: int) -> None:
        super().__init__()
        self.patch, self.side = patch, 28 // patch
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, self.side * self.side, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, attention, kernel, knn) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)
        self.grid = neighborhood_graph(self.side, self.side, kernel) if attention == "gat" else None  # (N, N) grid stencil
        self._batched: dict[int, gatx.Graph] = {}

    def graph_for(self, batch: int) -> gatx.Graph | None:
        if self.grid is None:
            return None
        if batch not in self._batched:  # built once per batch size, never per step
            self._batched[batch] = batch_graph(self.grid, batch)
        return self._batched[batch]

    def forward(self, images: Tensor) -> tuple[Tensor, list[Tensor | None]]:
        B = images.shape[0]
        patches = F.unfold(images.unsqueeze(1), self.patch, stride=self.patch).transpose(1, 2)  # (B, N, p*p)
        x = self.embed(patches) + self.pos
        graph, atts = self.graph_for(B), []
        for block in self.blocks:
            x, att = block(x, graph, self.side)
            atts.append(att)
        return self.head(self.norm(x).mean(1)), atts


def augment(x: Tensor, max_shift: int = 2) -> Tensor:
    """Random translations by up to max_shift pixels (zero padded)."""
    B = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, B))
    rows = (dy.view(B, 1) + torch.arange(28)).view(B, 28, 1)
    cols = (dx.view(B, 1) + torch.arange(28)).view(B, 1, 28)
    return padded[torch.arange(B).view(B, 1, 1), rows, cols]


@torch.no_grad()
def evaluate(model: PatchGraphNet, x: Tensor, y: Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch])[0].argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


def plot_attention(model: PatchGraphNet, x: Tensor, raw: Tensor, y: Tensor, path: Path, query: int) -> None:
    """Draw the last GAT layer's attention from patch `query` (head-averaged) over some images.

    x: the normalised images the model reads; raw: the same images as they are shown.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    with torch.no_grad():
        logits, atts = model(x)
    att, graph = atts[-1], model.graph_for(len(x))  # (E, H, 1) over the batched grid graph
    side, p = model.side, model.patch
    fig, axes = plt.subplots(1, len(x), figsize=(2.2 * len(x), 2.6))
    for b, ax in enumerate(axes):
        heat = torch.zeros(side * side)
        into = graph.dst == b * side * side + query  # edges into the chosen patch of image b
        heat.index_add_(0, graph.src[into] - b * side * side, att[into].mean((1, 2)))
        ax.imshow(raw[b], cmap="gray")
        heat = heat.view(side, side).kron(torch.ones(p, p)).numpy()
        ax.imshow(np.ma.masked_where(heat == 0, heat), cmap="autumn", alpha=0.6, vmin=0)
        qy, qx = divmod(query, side)
        ax.add_patch(plt.Rectangle((qx * p - 0.5, qy * p - 0.5), p, p, fill=False, ec="cyan", lw=2))
        ax.set_title(f"label {int(y[b])}, pred {int(logits[b].argmax())}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"attention of patch {query} (cyan) over its neighbours, last layer, mean over heads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows every option's default (None: the help says)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--data-dir", default=None, help="data root (default: $GATX_DATA_DIR, else datasets/)")
    ap.add_argument("--holdout", action="store_true", help="train on 8,000 test-split images, test on the other 2,000")
    ap.add_argument("--attention", choices=["gat", "na"], default="gat", help="GATConv on the grid graph, or NeighborhoodAttention2d")
    ap.add_argument("--knn", type=int, default=0, help="also attend over a k-nearest-neighbour feature graph (GAT only; 0: off)")
    ap.add_argument("--kernel", type=int, default=3, help="grid neighbourhood size (patches per side, odd)")
    ap.add_argument("--dim", type=int, default=64, help="node feature width")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (must divide --dim)")
    ap.add_argument("--depth", type=int, default=3, help="attention blocks")
    ap.add_argument("--epochs", type=int, default=12, help="training epochs")
    ap.add_argument("--batch-size", type=int, default=64, help="images per step")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, one-cycle schedule)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests; default: all)")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--plot", type=Path, default=None,
                    help="where to save the attention picture (default: runs/patch_graph/attention-<time>.png in the repository)")
    args = ap.parse_args(argv)
    for name in ("kernel", "dim", "heads", "depth", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.knn < 0 or (args.max_steps is not None and args.max_steps < 1):
        ap.error("--knn must be 0 or positive and --max-steps positive")
    if args.dim % args.heads:
        ap.error(f"--heads must divide --dim, got dim {args.dim} and {args.heads} heads")
    if args.kernel % 2 == 0 or args.kernel > 7:
        ap.error(f"--kernel must be odd and at most 7 (the patch grid is 7x7), got {args.kernel}")
    if args.knn > 49:
        ap.error(f"--knn must be at most 49 (patches per image), got {args.knn}")
    if args.attention == "gat":
        try:
            import matplotlib  # noqa: F401 - checked before training: the picture is drawn at the end
        except ImportError:
            ap.error("the attention picture needs matplotlib: pip install matplotlib (or use --attention na)")
    return args


def main(argv: list[str] | None = None, progress_bar: bool | None = None) -> float:
    args = parse_args(argv)
    torch.manual_seed(args.seed)

    if args.holdout:
        images, labels = load_mnist("test", args.data_dir)
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        train, test = perm[:8000], perm[8000:]
        x_tr, y_tr, x_te, y_te = images[train], labels[train], images[test], labels[test]
        print("data: MNIST test split only (--holdout): training on 8,000 of its images, testing on the other 2,000")
    else:
        x_tr, y_tr = load_mnist("train", args.data_dir)
        x_te, y_te = load_mnist("test", args.data_dir)
        print(f"data: MNIST train ({len(x_tr)}) -> test ({len(x_te)})")
    x_tr, x_te = x_tr.float() / 255.0, x_te.float() / 255.0
    mean, std = 0.1307, 0.3081
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std

    model = PatchGraphNet(4, args.dim, args.heads, args.depth, args.attention, args.kernel, args.knn)
    print(f"model: {args.depth} x {args.attention} attention over a 7x7 patch graph (kernel {args.kernel}"
          f"{f', knn {args.knn}' if args.knn else ''}), dim {args.dim}, {args.heads} heads, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    steps_per_epoch = (len(x_tr) + args.batch_size - 1) // args.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or args.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=total_steps, pct_start=0.15)
    if progress_bar if progress_bar is not None else sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=False)
    else:
        bar = None
    say = (lambda line: bar.write(line, file=sys.stdout)) if bar is not None else (lambda line: print(line, flush=True))
    quarter = max(1, steps_per_epoch // 4)
    step, t0 = 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm, seen, loss_sum, correct = torch.randperm(len(x_tr)), 0, 0.0, 0
        for i in range(0, len(x_tr), args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb, yb = augment(x_tr[idx]), y_tr[idx]
            logits, _ = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            if bar is not None:
                bar.set_description(f"epoch {epoch}/{args.epochs}", refresh=False)
                bar.set_postfix_str(f"loss {loss_sum / seen:.4f}", refresh=False)
                bar.update(1)
            if step % quarter == 0 and step < total_steps:
                spent = time.perf_counter() - t0
                say(f"  epoch {epoch:3d} step {step}/{total_steps} | loss {loss_sum / seen:.4f} | train acc "
                    f"{correct / seen:.4f} | {fmt_time(spent)} elapsed, ETA {fmt_time(spent / step * (total_steps - step))} "
                    "(training steps; each epoch also evaluates)")
            if args.max_steps and step >= args.max_steps:
                break
        acc = evaluate(model, x_te, y_te)
        say(f"epoch {epoch:3d} | loss {loss_sum / seen:.4f} | train acc {correct / seen:.4f} | "
            f"test acc {acc:.4f} | {time.perf_counter() - t0:6.1f} s")
        if args.max_steps and step >= args.max_steps:
            break
    if bar is not None:
        bar.close()
    if args.attention == "gat":
        plot_path = (args.plot or REPO / "runs" / "patch_graph" / f"attention-{time.strftime('%Y%m%d-%H%M%S')}.png").resolve()
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot_attention(model, x_te[:8], x_te[:8] * std + mean, y_te[:8], plot_path, query=(model.side * model.side) // 2)
        print(f"saved attention picture to {plot_path}")
    else:
        print("no attention picture: NeighborhoodAttention2d does not return its weights (use --attention gat)")
    split = "2,000 held-out test-split images" if args.holdout else f"the {len(x_te):,} MNIST test images"
    print(f"test accuracy {acc * 100:.2f}% on {split} ({time.perf_counter() - t0:.0f} s)")
    return acc


if __name__ == "__main__":
    try:
        main()
    except (DataError, ImportError) as err:  # expected: data missing offline, a missing optional package
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
