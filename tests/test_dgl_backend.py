"""The DGL import workaround and the fallback when DGL is absent, each in a fresh interpreter."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import dgl_or_none


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_importing_gatx_does_not_import_dgl():
    r = run_python("import sys, gatx; print('dgl' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_without_dgl_everything_runs_on_torch():
    r = run_python(
        """
        import sys, torch
        sys.modules['dgl'] = None  # makes `import dgl` fail, as on a machine without DGL
        import gatx
        from gatx.backends import dgl as b
        g = gatx.Graph(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]))
        out = gatx.GATConv(4, 2, 2)(g, torch.randn(3, 4))
        print(out.shape, b.availability())
        try:
            gatx.ops.edge_softmax(g, torch.zeros(3, 2), backend='dgl')
        except gatx.ops.BackendUnavailable as e:
            print('forced:', e)
        """
    )
    assert r.returncode == 0, r.stderr
    assert "torch.Size([3, 2, 2]) import dgl failed" in r.stdout
    assert "forced: backend 'dgl' cannot run this input: import dgl failed" in r.stdout


@pytest.mark.skipif(dgl_or_none() is None, reason="DGL is not importable here")
def test_public_import_dgl_warns_once_with_its_own_class_and_explains_graphbolt():
    r = run_python(
        """
        import sys, warnings
        import gatx
        assert 'dgl' not in sys.modules  # import gatx never imports DGL
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            dgl = gatx.import_dgl()
            again = gatx.import_dgl()
            import dgl as plain  # the user's own import now works and is the same module
        print(dgl is again is plain, [x.category.__name__ for x in w])
        print(issubclass(gatx.GatxDGLWorkaroundWarning, RuntimeWarning))
        try:
            from dgl.graphbolt import FusedCSCSamplingGraph
        except ImportError as e:
            print('from-import:', type(e).__name__, e)
        try:
            import dgl.graphbolt.impl
        except ImportError as e:
            print('submodule:', e)
        print('hasattr', hasattr(dgl.graphbolt, 'ItemSet'))
        """
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    if "from-import:" not in r.stdout:  # a DGL build that imports plainly: no stub, no warning
        assert lines[0] == "True []", r.stdout
        return
    assert lines[0] == "True ['GatxDGLWorkaroundWarning']" and lines[1] == "True", r.stdout
    assert lines[2].startswith("from-import: GraphboltImportError dgl.graphbolt.FusedCSCSamplingGraph is unavailable"), r.stdout
    assert "gatx replaced dgl.graphbolt with a stub" in lines[2] and "unknown location" not in r.stdout
    assert lines[3].startswith("submodule: dgl.graphbolt.impl is unavailable"), r.stdout
    assert lines[4] == "hasattr False", r.stdout


@pytest.mark.skipif(dgl_or_none() is None, reason="DGL is not importable here")
def test_graphbolt_stub_raises_clearly_when_touched():
    r = run_python(
        """
        import warnings
        from gatx.backends.dgl import import_dgl, GraphboltUnavailable
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            dgl = import_dgl()
        print('warned' if any('graphbolt' in str(x.message) for x in w) else 'silent')
        import torch
        g = dgl.graph((torch.tensor([0]), torch.tensor([0])))
        print(dgl.ops.edge_softmax(g, torch.ones(1, 1)).item())
        try:
            dgl.graphbolt.FusedCSCSamplingGraph
        except GraphboltUnavailable as e:
            print('stub:', e)
        """
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    stubbed = any(line.startswith("stub:") for line in lines)
    # Either DGL imported plainly (no stub, no warning) or through the stub (one warning, clear error).
    if stubbed:
        assert lines[0] == "warned" and "unavailable" in r.stdout and "gatx replaced dgl.graphbolt" in r.stdout
    else:
        assert lines[0] == "silent"
    assert lines[1] == "1.0"


def test_info_reports_backends():
    r = subprocess.run([sys.executable, "-m", "gatx.info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch      cpu  usable" in r.stdout and "dgl" in r.stdout
