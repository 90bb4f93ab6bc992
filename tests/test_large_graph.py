"""examples/large_graph.py: sampled-block training learns, matches dgl.nn.GATConv in the same loop,
layer-wise inference equals a full-graph forward, seeds shard into the global batch, and DDP over 2
processes (gloo, 127.0.0.1) reaches the parameters of 1 process with the same global batch and samples."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "large_graph.py"


def dgl_or_none():
    from gatx.backends.dgl import import_dgl

    try:
        return import_dgl()
    except ImportError:
        return None


pytestmark = [pytest.mark.skipif(dgl_or_none() is None, reason="DGL (the sampler) cannot be imported here"),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def load_example():
    spec = importlib.util.spec_from_file_location("large_graph_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_learns_and_matches_dgl_in_the_same_loop(capsys):
    # one torch thread: with several, DGL's sampling is not repeatable run to run, so the two runs
    # would not see the same blocks (the comparison below needs identical samples)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _tiny_run_learns_and_matches_dgl(capsys)
    finally:
        torch.set_num_threads(threads)


def _tiny_run_learns_and_matches_dgl(capsys):
    ex = load_example()
    ours = ex.main(["--tiny", "--epochs", "4"])
    out = capsys.readouterr().out
    assert ours["test_acc"] > 0.6, f"5 classes (chance 20%), got {100 * ours['test_acc']:.1f}%\n{out}"
    assert "final test accuracy:" in out and "homophily 0.6" in out
    theirs = ex.main(["--tiny", "--epochs", "2", "--impl", "dgl"])  # same init, samples and dropout draws
    for a, b in zip(ours["history"][:2], theirs["history"]):
        assert abs(a["loss"] - b["loss"]) < 1e-4, f"epoch {a['epoch']}: gatx loss {a['loss']}, dgl {b['loss']}"


def test_layerwise_inference_equals_full_graph_forward():
    import gatx
    from gatx.data.synthetic import make_sbm

    ex = load_example()
    data = make_sbm(500, 4000, num_classes=3, num_features=6, seed=2)
    g = ex.dgl_graph(data)
    args = ex.parse_args(["--hidden", "4", "--heads", "3", "--fanouts", "5,5,5"])
    torch.manual_seed(0)
    model = ex.build_model(args, 6, 3).double().eval()
    x = data.features.double()
    src, dst = g.formats("coo").edges()  # the example keeps only the CSC the sampler walks
    full = gatx.Graph(src.long(), dst.long(), data.num_nodes, data.num_nodes)
    h = x
    for i in range(3):
        h = model.apply_layer(i, full, h)
    got = ex.layerwise_inference(model, g, x, batch_size=64, device=torch.device("cpu"))
    diff = (got - h).abs().max().item()
    assert diff < 1e-12, f"max diff {diff}"


@pytest.mark.parametrize("world", [2, 3])
def test_shards_make_up_the_global_batches(world):
    ex = load_example()
    train = torch.randperm(1000)[:203]
    whole = ex.shard_seeds(train, 48, 0, 1, seed=5, epoch=2)
    parts = [ex.shard_seeds(train, 48, r, world, seed=5, epoch=2) for r in range(world)]
    assert len({p.numel() for p in parts}) == 1, "every process takes the same number of seeds"
    local = 48 // world
    for start in range(0, 4 * 48, 48):  # each full global batch is the union of the local batches
        step = start // 48
        union = torch.cat([p[step * local : (step + 1) * local] for p in parts])
        assert torch.equal(union, whole[start : start + 48])
    assert torch.equal(whole.sort().values, train.sort().values), "one process sees every training node"
    assert not torch.equal(whole, ex.shard_seeds(train, 48, 0, 1, seed=5, epoch=3)), "reshuffled per epoch"


def test_missing_data_ends_with_one_line(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GATX_DATA_MIRROR", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(sys, "argv", ["large_graph.py", "--dataset", "ogbn-arxiv", "--data-dir", str(tmp_path)])
    assert load_example().cli() == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("large_graph.py: error: 1 data file(s) missing") and str(tmp_path / "ogb" / "arxiv.zip") in err[-1]
    assert "Traceback" not in "\n".join(err)


# ------------------------------------------------------------------ DDP equivalence (subprocesses)
def frozen_frontiers(g, fanouts, seed):
    """One sampled graph per layer: up to ``fanout`` in-edges per node, drawn once with numpy, so the
    blocks of any seed set are the same in every process."""
    dgl = dgl_or_none()
    src, dst = (t.numpy() for t in g.formats("coo").edges())
    out = []
    for layer, fanout in enumerate(fanouts):
        key = np.random.default_rng(seed + layer).random(src.size)
        order = np.lexsort((key, dst))  # by dst, random within
        rank = np.arange(src.size) - np.searchsorted(dst[order], dst[order], side="left")
        keep = order[rank < fanout]
        out.append(dgl.graph((torch.from_numpy(src[keep]), torch.from_numpy(dst[keep])), num_nodes=g.num_nodes()))
    return out


def ddp_worker(out: str) -> dict:
    """Run by each process: two epochs of 3 steps, global batch 64, in float64 and float32."""
    dgl = dgl_or_none()
    from gatx.data.synthetic import make_sbm

    class FrozenSampler(dgl.dataloading.BlockSampler):
        def __init__(self, frontiers):
            super().__init__()
            self.frontiers = frontiers

        def sample_blocks(self, g, seed_nodes, exclude_eids=None):
            output_nodes, blocks = seed_nodes, []
            for frontier in reversed(self.frontiers):  # output layer first
                block = dgl.to_block(dgl.in_subgraph(frontier, seed_nodes), seed_nodes)
                seed_nodes = block.srcdata[dgl.NID]
                blocks.insert(0, block)
            return seed_nodes, output_nodes, blocks

    ex = load_example()
    rank, world, device = ex.setup_distributed("cpu")
    data = make_sbm(600, 6000, num_classes=4, num_features=8, split=(0.5, 0.1), seed=0)
    g = ex.dgl_graph(data)
    sampler = FrozenSampler(frozen_frontiers(g, [4, 3], seed=0))
    args = ex.parse_args(["--hidden", "4", "--heads", "2", "--fanouts", "4,3", "--dropout", "0", "--lr", "0.01"])
    result = {}
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        net = ex.build_model(args, 8, 4).to(dtype)
        result[f"init_{dtype}"] = {k: v.clone() for k, v in net.state_dict().items()}
        model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        for epoch in (1, 2):
            seeds = ex.shard_seeds(data.train_idx, 64, rank, world, 0, epoch)
            stats = ex.train_epoch(model, opt, g, data.features.to(dtype), data.labels, seeds, sampler, 64 // world,
                                   device, max_steps=3)
            assert stats["steps"] == 3 and stats["seeds"] == 3 * 64 // world, stats
        result[str(dtype)] = net.state_dict()
    if rank == 0:
        torch.save(result, out)
    if world > 1:
        torch.distributed.destroy_process_group()
    return result


def test_ddp_two_processes_match_one_process(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": "2", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path / "ddp.pt")], cwd=REPO, text=True,
                              env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(2)]
    try:
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # meanwhile, here: 1 process, the whole batch
            monkeypatch.delenv(name, raising=False)
        single = ddp_worker(str(tmp_path / "single.pt"))
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(logs)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for dtype, tol in (("torch.float64", 1e-12), ("torch.float32", 1e-5)):
        moved = max((single[dtype][k] - single[f"init_{dtype}"][k]).abs().max().item() for k in single[dtype])
        assert moved > 1e-2, f"training must change the parameters (moved {moved})"
        diff = max((ddp[dtype][k] - single[dtype][k]).abs().max().item() for k in single[dtype])
        assert diff < tol, f"{dtype}: DDP (2 x 32) vs 1 process (64): max parameter diff {diff}"
        print(f"{dtype}: max |DDP - single| = {diff:.3g} after 6 steps (parameters moved {moved:.3g})")


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    ddp_worker(sys.argv[1])
