"""The vision attention zoo on one kernel: the same tiny two-stage network with each attention kind.

Every kind below is ``gatx.ops.sparse_attention`` over a graph built for it: neighborhood attention
(NATTEN's clamped k x k neighborhoods), Swin's (shifted) windows, VOLO's outlook attention (generated
logits over (window, position) virtual queries, then a fold), BiFormer's bi-level routing attention
(a block-diagonal graph routed per sample and per forward) and ACmix (reflection-padded windows, so
border keys appear twice, plus its convolution branch).

Data: the MNIST test split only (as ``patch_graph.py --holdout``): train on 8,000 images, test on the
other 2,000. Each kind trains in its own process (fresh memory accounting) with the same seed, and the
script prints one table (accuracy, ms per training epoch, peak memory) and saves a PNG of it.

    python examples/vision_zoo.py                       # all five kinds, 3 epochs each (~5-8 min, 2 cores)
    python examples/vision_zoo.py --kinds outlook acmix --epochs 1
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("neighborhood", "window", "outlook", "routing", "acmix")


def make_attention(kind: str, dim: int, heads: int, side: int) -> nn.Module:
    """One attention layer of the given kind for a (B, side, side, dim) channels-last map."""
    from gatx import vision

    if kind == "neighborhood":
        return vision.NeighborhoodAttention2d(dim, heads, kernel_size=3)
    if kind == "window":
        return vision.WindowAttention(dim, window_size=7, num_heads=heads, shift_size=3 if side > 7 else 0)
    if kind == "outlook":
        return vision.OutlookAttention(dim, heads, kernel_size=3, padding=1, stride=1)
    if kind == "routing":
        return vision.BiLevelRoutingAttention(dim, num_heads=heads, n_win=7, topk=4, side_dwconv=3)
    if kind == "acmix":
        return ChannelsLast(vision.ACmix(dim, dim, kernel_att=5, head=heads, kernel_conv=3))
    raise ValueError(f"unknown attention kind {kind!r}; choose from {KINDS}")


class ChannelsLast(nn.Module):
    """Runs a (B, C, Y, X) module on a (B, Y, X, C) map."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm attention and MLP, both residual, on a (B, Y, X, C) map."""

    def __init__(self, kind: str, dim: int, heads: int, side: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = make_attention(kind, dim, heads, side)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ZooNet(nn.Module):
    """28x28 -> two-conv stem (14x14, dims[0]) -> block -> 2x2 patch merge (7x7, dims[1]) -> block -> classes."""

    def __init__(self, kind: str, dims: tuple[int, int] = (32, 64), heads: tuple[int, int] = (2, 4)) -> None:
        super().__init__()
        self.stem = nn.Sequential(  # (B, 1, 28, 28) -> (B, C1, 14, 14)
            nn.Conv2d(1, dims[0] // 2, 3, padding=1), nn.GELU(), nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1)
        )
        self.stage1 = Block(kind, dims[0], heads[0], 14)
        self.merge = nn.Conv2d(dims[0], dims[1], 2, stride=2)
        self.stage2 = Block(kind, dims[1], heads[1], 7)
        self.norm, self.head = nn.LayerNorm(dims[1]), nn.Linear(dims[1], 10)

    def forward(self, images: Tensor) -> Tensor:  # images (B, 28, 28)
        x = self.stem(images.unsqueeze(1)).permute(0, 2, 3, 1)  # (B, 14, 14, C1)
        x = self.stage1(x)
        x = self.merge(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, 7, 7, C2)
        x = self.stage2(x)
        return self.head(self.norm(x).mean((1, 2)))


def holdout_split(data_dir: str | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST test split, normalised: 8,000 training and 2,000 held-out images (fixed permutation)."""
    from gatx.data import load_mnist

    images, labels = load_mnist("test", data_dir)
    images = (images.float() / 255.0 - 0.1307) / 0.3081
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = perm[:8000], perm[8000:]
    return images[train], labels[train], images[test], labels[test]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


def max_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_kind(kind: str, args: argparse.Namespace) -> dict:
    """Train and test one kind in this process; returns its row of the table."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    x_tr, y_tr, x_te, y_te = holdout_split(args.data_dir)
    model = ZooNet(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * ((len(x_tr) + args.batch_size - 1) // args.batch_size)
    if args.max_steps:
        steps = min(steps, args.max_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps, pct_start=0.15)
    base_mib = max_rss_mib()
    epoch_ms, curve, step = [], [], 0
    bar = progress(total=steps, desc=f"{kind:>12}")
    for epoch in range(args.epochs):
        t0, perm = time.perf_counter(), torch.randperm(len(x_tr))
        for i in range(0, len(x_tr), args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step >= steps:
                break
        epoch_ms.append((time.perf_counter() - t0) * 1000)
        curve.append(accuracy(model, x_te, y_te))
        bar.write(f"{kind:>12} | epoch {epoch + 1} | loss {loss.item():.4f} | held-out acc {curve[-1]:.4f} | "
                  f"{epoch_ms[-1] / 1000:.1f} s")
        if step >= steps:
            break
    bar.close()
    return {
        "kind": kind, "accuracy": curve[-1], "curve": curve, "ms_per_epoch": sorted(epoch_ms)[len(epoch_ms) // 2],
        "peak_mib": max_rss_mib() - base_mib, "params": sum(p.numel() for p in model.parameters()),
        "epochs": len(epoch_ms), "steps": step,
    }


class _Lines:
    """Progress as plain lines (when stdout is not a terminal): one line per quarter of the run."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n, self.t0, self.next = total, desc, 0, time.perf_counter(), total // 4

    def update(self, k: int) -> None:
        self.n += k
        if self.n >= self.next and self.n < self.total:
            rate = self.n / (time.perf_counter() - self.t0)
            print(f"{self.desc}: step {self.n}/{self.total}, ETA {(self.total - self.n) / rate:.0f} s", flush=True)
            self.next += max(self.total // 4, 1)

    def write(self, msg: str) -> None:
        print(msg, flush=True)

    def close(self) -> None:
        pass


def progress(total: int, desc: str):
    """A tqdm bar with ETA on a terminal, plain progress lines otherwise."""
    if sys.stdout.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="step", leave=False)
    return _Lines(total, desc)


def _worker(kind: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    try:
        queue.put(train_kind(kind, args))
    except Exception as err:  # noqa: BLE001 - reported as the kind's row
        queue.put({"kind": kind, "error": f"{type(err).__name__}: {err}"})


def run_isolated(kind: str, args: argparse.Namespace) -> dict:
    """train_kind in a fresh process, so each kind's peak memory is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(kind, args, queue))
    proc.start()
    row = queue.get()
    proc.join()
    return row


def save_plot(rows: list[dict], path: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    names = [r["kind"] for r in ok]
    for ax, key, label in zip(axes, ("accuracy", "ms_per_epoch", "peak_mib"),
                              ("held-out accuracy", "ms / training epoch", "peak memory above start (MiB)")):
        vals = [r[key] * (100 if key == "accuracy" else 1) for r in ok]
        ax.bar(names, vals, color="tab:blue")
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}" if key == "accuracy" else f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    if ok:
        axes[0].set_ylim(min(r["accuracy"] * 100 for r in ok) - 5, 100)
    fig.suptitle(f"gatx vision zoo: one tiny two-stage net per attention kind, MNIST test-split holdout ({note})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="attention kinds to train")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-steps", type=int, default=0, help="stop each kind after this many steps (0: no limit)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None, help="data root (default: $GATX_DATA_DIR, else datasets/)")
    ap.add_argument("--out", default=os.path.join("runs", "vision_zoo"),
                    help="directory for vision_zoo.json and vision_zoo.png")
    args = ap.parse_args(argv)
    try:
        holdout_split(args.data_dir)  # fail early, with the loader's message, when the data is missing
    except OSError as err:
        sys.exit(f"vision_zoo: {err}")
    print(f"vision zoo: {len(args.kinds)} kinds x {args.epochs} epochs on 8,000 MNIST test-split images, "
          f"held-out 2,000; {args.threads} threads each", flush=True)
    load_start = os.getloadavg()[0]
    rows = [run_isolated(kind, args) for kind in args.kinds]
    load_end = os.getloadavg()[0]
    note = f"{args.threads} thread(s), load average {load_start:.1f} -> {load_end:.1f} on {os.cpu_count()} cores"
    if max(load_start, load_end) > (os.cpu_count() or 1):
        note += ": busy machine, timings unreliable"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vision_zoo.json").write_text(json.dumps({"note": note, "rows": rows}, indent=1))
    save_plot(rows, out / "vision_zoo.png", note)
    print(f"\n| kind | held-out accuracy | ms / epoch | peak memory (MiB) | parameters |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['kind']} | failed: {r['error']} | | | |")
        else:
            print(f"| {r['kind']} | {r['accuracy'] * 100:.2f}% | {r['ms_per_epoch']:.0f} | {r['peak_mib']:.0f} | "
                  f"{r['params']:,} |")
    print(f"\n{note}; peak memory = growth of the process's peak RSS during training and evaluation")
    print(f"saved {out / 'vision_zoo.json'} and {out / 'vision_zoo.png'}")
    return rows


if __name__ == "__main__":
    main()
