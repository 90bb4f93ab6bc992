"""Reproduce GAT (Velickovic et al., ICLR 2018) on Cora, CiteSeer and PubMed with gatx.

The paper's transductive setup: two GAT layers, 8 heads x 8 hidden units with ELU, then one output
head (8 averaged heads on PubMed); dropout 0.6 on both layers' inputs and on the attention; Adam with
lr 0.005 and weight decay 5e-4 (PubMed: 0.01 and 1e-3); early stopping with patience 100.

By default the example follows the authors' TensorFlow implementation where it is more specific than
the paper: every head draws its own input-dropout mask and the aggregated features are dropped too
(``GATConv(head_feat_drop=True, value_drop=0.6)``; ``--dropout shared``: one mask, as DGL and PyG),
weights start per-head Glorot-uniform (``--init dgl``: GATConv's Xavier-normal), and model selection
is their rule (``--stop paper``: patience restarts when val accuracy or val loss is at least as good
as ever, the model is kept when both are; ``--stop loss``: lowest val loss). The reported number is
the test accuracy of the kept model. Features are row-normalised and stay sparse (CSR):
``gatx.GATConv`` projects them without densifying.

    python examples/cora.py                        # Cora, 10 seeds: mean +- std test accuracy
    python examples/cora.py --dataset citeseer
    python examples/cora.py --impl dgl             # same model, data and loop on dgl.nn.GATConv
    python examples/cora.py --runs 1 --log-every 1 # one seed, a line per epoch
    python examples/cora.py --plot                 # also a training-curve PNG beside the metrics file
    python examples/cora.py --device cuda          # on a GPU (gatx's Triton kernels; pip install triton)

Progress: a bar over all runs and epochs with an ETA when stderr is a terminal, plus a plain line every
``--log-every`` epochs and one per run (with elapsed time and ETA). The run ends with a table (per-run
accuracy, mean +- std, epoch time) and writes per-epoch loss and accuracy of every run to a JSON file
(``--out``; default ``runs/cora/<dataset>-<impl>-<time>.json`` in the repository, git-ignored).

Data comes from ``--data-dir`` (else $GATX_DATA_DIR, else the repository's datasets/ folder) and is
downloaded there on first use; see datasets/README.md.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gatx
from gatx.data import DataError, load_planetoid, row_normalize

REPO = Path(__file__).resolve().parents[1]

# (output heads, learning rate, weight decay) from the paper
PAPER = {"cora": (1, 0.005, 5e-4), "citeseer": (1, 0.005, 5e-4), "pubmed": (8, 0.01, 1e-3)}


class GAT(nn.Module):
    """Two attention layers: (N, F) -> (N, H*D) with ELU -> (N, C) averaged over the output heads."""

    def __init__(self, conv, in_feats: int, classes: int, out_heads: int, heads: int = 8, hidden: int = 8,
                 dropout: float = 0.6, style: str = "paper") -> None:
        super().__init__()
        extra = dict(head_feat_drop=True, value_drop=dropout) if style == "paper" else {}
        self.layer1 = conv(in_feats, hidden, heads, feat_drop=dropout, attn_drop=dropout, activation=F.elu, **extra)
        self.layer2 = conv(hidden * heads, classes, out_heads, feat_drop=dropout, attn_drop=dropout, **extra)

    def forward(self, graph, x: Tensor) -> Tensor:
        h = self.layer1(graph, x).flatten(1)  # (N, H*D)
        return self.layer2(graph, h).mean(1)  # (N, C)


def glorot_per_head(model: nn.Module) -> None:
    """The authors' initialisation (TensorFlow's default for their per-head 1x1 convolutions): each
    head's projection and attention vectors uniform in +-sqrt(6 / (fan_in + fan_out)), biases zero."""
    for layer in (model.layer1, model.layer2):
        H, D = layer.attn_l.shape[1], layer.attn_l.shape[2]
        with torch.no_grad():
            for w in layer.fc.weight.view(H, D, -1):  # (D, F) per head
                bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
                w.uniform_(-bound, bound)
            for attn in (layer.attn_l, layer.attn_r):  # (1, H, D): a (D -> 1) kernel per head
                attn.uniform_(-math.sqrt(6.0 / (D + 1)), math.sqrt(6.0 / (D + 1)))
            if layer.bias is not None:
                layer.bias.zero_()


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


class EarlyStopping:
    """Stop after ``patience`` epochs without progress; ``step`` returns (save this model, stop now).

    ``rule="loss"``: progress is a validation loss at least as low as ever, and that model is saved.
    ``rule="paper"``: the authors' code: patience restarts when val accuracy or val loss is at least
    as good as ever, and the model is saved only when both are.
    """

    def __init__(self, patience: int, rule: str = "loss") -> None:
        self.patience, self.rule, self.best_acc, self.best_loss, self.waited = patience, rule, -1.0, math.inf, 0

    def step(self, val_acc: float, val_loss: float) -> tuple[bool, bool]:
        acc_ok, loss_ok = val_acc >= self.best_acc, val_loss <= self.best_loss
        save = loss_ok if self.rule == "loss" else acc_ok and loss_ok
        progress = loss_ok if self.rule == "loss" else acc_ok or loss_ok
        self.best_acc, self.best_loss = max(val_acc, self.best_acc), min(val_loss, self.best_loss)
        self.waited = 0 if progress else self.waited + 1
        return save, self.waited >= self.patience


class Progress:
    """Runs x epochs: a tqdm bar (stderr) when stderr is a terminal, and plain lines on stdout.

    ETA: the remaining epochs times the mean epoch time so far. The current run needs at least its
    remaining patience; later runs are assumed to last as long as the finished ones did on average
    (before the first run ends, ``patience`` epochs each: the ETA is then a lower bound, shown ">=").
    """

    def __init__(self, runs: int, patience: int, log_every: int, bar: bool | None = None, max_epochs: int = 100000) -> None:
        self.runs, self.patience, self.log_every, self.max_epochs = runs, min(patience, max_epochs), log_every, max_epochs
        self.start, self.finished, self.epochs_done, self.first_end = time.perf_counter(), [], 0, 0.0
        if bar is None:
            bar = sys.stderr.isatty()
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(unit="epoch", dynamic_ncols=True, leave=False)

    def eta(self, epoch: int, waited: int) -> str:
        """Remaining time while run ``len(self.finished) + 1`` is at ``epoch`` with ``waited`` epochs of patience spent."""
        later = self.runs - len(self.finished) - 1
        typical = statistics.mean(self.finished) if self.finished else self.patience
        left = min(max(typical - epoch, self.patience - waited), self.max_epochs - epoch) + later * typical
        if self.bar is not None and self.finished:
            self.bar.total = self.bar.n + left
        if self.epochs_done < 2:
            return "-"
        per_epoch = (time.perf_counter() - self.first_end) / (self.epochs_done - 1)  # the first epoch pays setup
        return ("" if self.finished else ">=") + fmt_time(left * per_epoch)

    def elapsed(self) -> str:
        return fmt_time(time.perf_counter() - self.start)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def epoch(self, run: int, epoch: int, waited: int, row: dict) -> None:
        self.epochs_done += 1
        if self.epochs_done == 1:
            self.first_end = time.perf_counter()
        eta = self.eta(epoch, waited)
        if self.bar is not None:
            self.bar.set_description(f"run {run}/{self.runs}", refresh=False)
            self.bar.set_postfix_str(f"val {row['val_acc']:.1%}, patience {waited}/{self.patience}"
                                     + ("" if self.finished else f", ETA {eta}"), refresh=False)
            self.bar.update(1)
        if self.log_every and (epoch % self.log_every == 0 or epoch == 1):
            self.write(f"  run {run:2d} epoch {epoch:4d} | train loss {row['train_loss']:.4f} | acc: train "
                       f"{row['train_acc']:6.2%} val {row['val_acc']:6.2%} | val loss {row['val_loss']:.4f} | "
                       f"{row['ms']:6.1f} ms | {self.elapsed()} elapsed, ETA {eta}")

    def run_done(self, epochs: int) -> None:
        self.finished.append(epochs)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def train_one(args, seed: int, conv, graph, x: Tensor, data, run: int, progress: Progress) -> dict:
    """One seed: train until validation stops improving; the test accuracy at the saved point.

    ``history`` holds one entry per epoch: the training loss (dropout on, as trained), accuracies of
    the eval-mode model (no dropout) on the train / val / test nodes, the val loss, and the epoch time.
    """
    torch.manual_seed(seed)
    out_heads, lr, wd = PAPER[args.dataset]
    model = GAT(conv, x.shape[1], data.num_classes, out_heads, style=args.dropout)
    if args.init == "paper":
        glorot_per_head(model)
    model.to(x.device)  # initialised on the CPU: the same weights for a seed on every device
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    y, train, val, test = (t.to(x.device) for t in (data.labels, data.train_mask, data.val_mask, data.test_mask))
    stopper, saved, times = EarlyStopping(args.patience, args.stop), None, []
    history = {k: [] for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_acc", "ms")}
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        model.train()
        logits = model(graph, x)
        loss = F.cross_entropy(logits[train], y[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            out = model(graph, x)
            val_loss = F.cross_entropy(out[val], y[val]).item()
        train_acc, val_acc, test_acc = accuracy(out[train], y[train]), accuracy(out[val], y[val]), accuracy(out[test], y[test])
        times.append(time.perf_counter() - start)
        row = dict(epoch=epoch, train_loss=loss.item(), train_acc=train_acc, val_loss=val_loss, val_acc=val_acc,
                   test_acc=test_acc, ms=times[-1] * 1e3)
        for key, value in row.items():
            history[key].append(value)
        save, stop = stopper.step(val_acc, val_loss)
        progress.epoch(run, epoch, stopper.waited, row)
        if save:  # the saved model's test accuracy, measured now rather than by reloading it
            saved = (epoch, val_acc, test_acc)
        if stop:
            break
    steady = times[1:] or times  # the first epoch pays one-time setup
    return dict(seed=seed, epochs=epoch, best_epoch=saved[0], val=saved[1], test=saved[2],
                ms=statistics.median(steady) * 1e3, history=history)


def build(args, data):
    """The layer class, graph and features for the chosen implementation; a short and a long label."""
    x = row_normalize(data.features)  # (N, F) sparse CSR
    graph = data.graph.add_self_loops()  # as the paper / DGL / PyG GAT examples
    if args.impl == "dgl":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gatx.GatxDGLWorkaroundWarning)  # the header says which DGL runs
            dgl = gatx.import_dgl()
        g = graph.to_dgl()
        if args.device != "cpu":
            try:
                g = g.to(args.device)
            except Exception as err:  # noqa: BLE001 - DGL's CPU-only builds refuse CUDA with their own error types
                raise gatx.ops.BackendUnavailable(f"DGL {dgl.__version__} cannot move a graph to {args.device}: {err}") from err
        return dgl.nn.GATConv, g, x.to_dense().to(args.device), ("dgl", f"dgl.nn.GATConv (DGL {dgl.__version__}), dense features")
    if args.dense:
        x = x.to_dense()
    graph, x = graph.to(args.device), x.to(args.device)
    backend = None if args.backend == "auto" else args.backend
    # a forced backend that cannot run raises BackendUnavailable with its reasons, before any training
    ran = gatx.ops.select(backend, graph, torch.zeros(graph.num_src, 1, device=args.device), op="sparse_attention",
                          score="additive").NAME
    conv = functools.partial(gatx.GATConv, backend=backend)
    layout = "dense" if args.dense else "sparse CSR"
    return conv, graph, x, (f"gatx[{ran}]", f"gatx.GATConv, backend {args.backend} -> {ran}, {layout} features")


def write_metrics(path: Path, payload: dict) -> None:
    """Write JSON atomically (a partial file never replaces a complete one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def plot_curves(runs: list[dict], title: str, path: Path) -> None:
    """Training curves of every run: losses and accuracies per epoch, the kept model's epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(runs):
        h, c = r["history"], f"C{i % 10}"
        ax_loss.plot(h["epoch"], h["train_loss"], color=c, alpha=0.35, lw=0.8)
        ax_loss.plot(h["epoch"], h["val_loss"], color=c, lw=1.2, label=f"seed {r['seed']}")
        ax_acc.plot(h["epoch"], [100 * a for a in h["train_acc"]], color=c, alpha=0.35, lw=0.8)
        ax_acc.plot(h["epoch"], [100 * a for a in h["val_acc"]], color=c, lw=1.2)
        ax_acc.plot([r["best_epoch"]], [100 * r["test"]], marker="*", ms=10, color=c, ls="none")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy")
    ax_loss.set_title("loss: val (solid), train with dropout (faint)", fontsize=9)
    ax_acc.set(xlabel="epoch", ylabel="accuracy %", ylim=(0, 100))
    ax_acc.set_title("accuracy, eval mode: val (solid), train (faint); star: test, kept model", fontsize=9)
    ax_loss.legend(fontsize=7, ncol=2)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_table(runs: list[dict]) -> str:
    lines = [" run  seed  epochs  kept epoch  val acc  test acc  ms/epoch"]
    for i, r in enumerate(runs, 1):
        lines.append(f"{i:4d}  {r['seed']:4d}  {r['epochs']:6d}  {r['best_epoch']:10d}  {r['val']:7.2%}  {r['test']:8.2%}  {r['ms']:8.1f}")
    return "\n".join(lines)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows every option's default (None: the help says)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="cora", choices=sorted(PAPER), help="Planetoid dataset")
    p.add_argument("--runs", type=int, default=10, help="seeds seed, seed+1, ...; reports mean +- std")
    p.add_argument("--epochs", type=int, default=100000,
                   help="at most this many epochs per run; early stopping ends runs long before (as the authors)")
    p.add_argument("--patience", type=int, default=100, help="early-stopping patience in epochs")
    p.add_argument("--stop", default="paper", choices=["paper", "loss"],
                   help="model selection: paper, the authors' val accuracy + loss rule; loss, lowest val loss")
    p.add_argument("--dropout", default="paper", choices=["paper", "shared"],
                   help="paper: the authors' implementation, an input-dropout mask per head and dropout on the "
                        "aggregated features; shared: one mask for all heads, as DGL and PyG")
    p.add_argument("--init", default="paper", choices=["paper", "dgl"],
                   help="paper: the authors' per-head Glorot-uniform weights; dgl: GATConv's own "
                        "(DGL's Xavier-normal with the ReLU gain)")
    p.add_argument("--impl", default="gatx", choices=["gatx", "dgl"], help="whose GATConv")
    p.add_argument("--backend", default="auto", choices=["auto", *gatx.ops.BACKENDS],
                   help="gatx backend; auto picks the fastest that can run the input")
    p.add_argument("--dense", action="store_true", help="gatx: feed dense features instead of sparse CSR")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index> (on CUDA gatx runs its Triton kernels)")
    p.add_argument("--data-dir", default=None, help="data root (default: $GATX_DATA_DIR, else datasets/)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--log-every", type=int, default=50, help="print a progress line every N epochs, 0: never")
    p.add_argument("--out", type=Path, default=None,
                   help="metrics JSON (default: runs/cora/<dataset>-<impl>-<time>.json in the repository)")
    p.add_argument("--plot", action="store_true", help="also save training curves as a PNG beside the metrics file")
    args = p.parse_args(argv)
    for name in ("runs", "epochs", "patience"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.device != "cpu" and not (args.device == "cuda" or args.device.startswith("cuda:")):
        p.error(f"--device must be cpu, cuda or cuda:<index>, got {args.device!r}")
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU")
    if args.log_every < 0:
        p.error(f"--log-every must be 0 (never) or positive, got {args.log_every}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install matplotlib")
    if args.impl == "dgl" and args.dropout == "paper":
        args.dropout = "shared"  # dgl.nn.GATConv has one input-dropout mask and no value dropout
    return args


def main(argv: list[str] | None = None, progress_bar: bool | None = None) -> dict:
    args = parse_args(argv)
    data = load_planetoid(args.dataset, args.data_dir)
    conv, graph, x, (label, what) = build(args, data)
    out = args.out or REPO / "runs" / "cora" / f"{args.dataset}-{label.replace('[', '-').rstrip(']')}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    print(f"{data}\n{what}; dropout: {args.dropout}; model selection: {args.stop}, patience {args.patience}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}", flush=True)
    if args.log_every:
        print(f"every {args.log_every} epochs: the training loss (with dropout), accuracies of the eval-mode model, "
              "the val loss, the epoch time", flush=True)
    payload = dict(command=" ".join(["python", "examples/cora.py", *(sys.argv[1:] if argv is None else argv)]),
                   args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   dataset=args.dataset, impl=label, description=what,
                   env=dict(gatx=gatx.__version__, torch=torch.__version__, threads=torch.get_num_threads(), device=args.device,
                            gpu=torch.cuda.get_device_name(args.device) if args.device != "cpu" else None,
                            python=platform.python_version(), time=time.strftime("%Y-%m-%d %H:%M:%S")),
                   runs=[])
    progress = Progress(args.runs, args.patience, args.log_every, bar=progress_bar, max_epochs=args.epochs)
    runs = payload["runs"]
    try:
        for run in range(args.runs):
            r = train_one(args, args.seed + run, conv, graph, x, data, run + 1, progress)
            runs.append(r)
            progress.run_done(r["epochs"])
            write_metrics(out, payload)  # after every run: an interrupted job keeps the finished runs
            eta = progress.eta(0, 0) if run + 1 < args.runs else "0:00"
            progress.write(f"run {run + 1:2d}/{args.runs} seed {r['seed']}: stopped at epoch {r['epochs']}, best epoch "
                           f"{r['best_epoch']}: val {r['val']:.2%}, test {r['test']:.2%} | {r['ms']:.1f} ms/epoch | "
                           f"{progress.elapsed()} elapsed, ETA {eta}")
    finally:
        progress.close()
    tests = [100 * r["test"] for r in runs]
    std = statistics.stdev(tests) if len(tests) > 1 else 0.0
    ms = statistics.median(r["ms"] for r in runs)
    payload["summary"] = dict(test_acc_mean=statistics.mean(tests), test_acc_std=std, ms_per_epoch_median=ms,
                              seconds=round(time.perf_counter() - progress.start, 1))
    write_metrics(out, payload)
    summary = (f"{args.dataset} | {label} | dropout={args.dropout} stop={args.stop} | {args.runs} run(s) | test accuracy "
               f"{statistics.mean(tests):.2f} ± {std:.2f} % | {ms:.1f} ms per train+eval epoch (median)")
    print(f"\n{summary_table(runs)}\n{summary}\nmetrics (per-epoch loss and accuracy of every run): {out}")
    if args.plot:
        png = out.with_suffix(".png")
        plot_curves(runs, summary, png)
        print(f"training curves: {png}")
    return dict(dataset=args.dataset, impl=label, test_acc=tests, mean=statistics.mean(tests), std=std,
                ms_per_epoch=ms, runs=runs, metrics=str(out))


if __name__ == "__main__":
    try:
        main()
    except (DataError, ImportError, gatx.ops.BackendUnavailable) as err:  # expected: missing data, no DGL, forced backend
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted (finished runs are in the metrics file)")
