"""Figures: returned as matplotlib Figures made without pyplot, saved when given a path, drawn into the
caller's Axes when given one; content size checked, not pixels."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402

import repkern  # noqa: E402
from repkern import plots  # noqa: E402

PROFILES = {"in-dist": {"hoyer": [0.1, 0.2, 0.3], "l0": [1, 2, 3]},
            "shuffled": {"hoyer": [0.2, 0.1, 0.4], "l0": [3, 2, 1]}}


def test_cka_heatmap_returns_the_figure_and_saves_png(tmp_path):
    m = torch.rand(3, 4)
    m[1, 2] = float("nan")
    path = tmp_path / "cka.png"
    fig = plots.cka_heatmap(m, ["a", "b", "c"], ["w", "x", "y", "z"], str(path), title="t")
    assert isinstance(fig, Figure) and fig.axes[0].get_title() == "t"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert isinstance(plots.cka_heatmap(m, list("abc"), list("wxyz")), Figure)  # no path: nothing written
    assert os.listdir(tmp_path) == ["cka.png"]
    with pytest.raises(ValueError, match="labels"):
        plots.cka_heatmap(m, ["a"], ["w"], str(tmp_path / "bad.png"))


def test_sparsity_profiles_returns_the_figure_and_saves_png(tmp_path):
    fig = plots.sparsity_profiles(PROFILES, ["emb", "l1", "l2"], str(tmp_path / "s.png"))
    assert isinstance(fig, Figure) and [ax.get_title() for ax in fig.axes] == ["hoyer", "l0"]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="expected 2 layers"):
        plots.sparsity_profiles(PROFILES, ["emb", "l1"], str(tmp_path / "bad.png"))


def test_drawing_into_the_callers_axes(tmp_path):
    fig = Figure()
    left, middle, right = fig.subplots(1, 3)
    assert plots.cka_heatmap(torch.rand(2, 2), ["a", "b"], ["c", "d"], ax=left, title="mine") is fig
    assert len(left.images) == 1 and left.get_title() == "mine"
    assert plots.sparsity_profiles(PROFILES, ["emb", "l1", "l2"], tmp_path / "s.svg", ax=[middle, right]) is fig
    assert [len(ax.lines) for ax in (middle, right)] == [2, 2] and (tmp_path / "s.svg").read_bytes()[:5] == b"<?xml"
    assert plots.sparsity_profiles(PROFILES, ["emb", "l1", "l2"], ax=right, metrics=["l0"]) is fig
    with pytest.raises(ValueError, match="ax: got 1 Axes for 2 metrics"):
        plots.sparsity_profiles(PROFILES, ["emb", "l1", "l2"], ax=middle)


def test_plotting_leaves_pyplot_and_its_backend_alone(tmp_path):
    """A notebook's pyplot state: its backend and its open figures stay (matplotlib.use("Agg") closed them)."""
    script = textwrap.dedent(f"""
        import matplotlib
        matplotlib.use("pdf")
        import matplotlib.pyplot as plt
        import torch
        import repkern
        from repkern.bench import report

        users = plt.figure()
        result = repkern.CkaResult(matrix=torch.rand(2, 2), layers_a=["a", "b"], layers_b=["a", "b"],
                                   kernel="linear", debiased=False, estimator="exact", pool="mean", samples=4,
                                   batches=1)
        result.plot()
        result.plot({str(tmp_path / "cka.png")!r})
        common = dict(suite="gram", shape="n=8", dtype="float32", device="cpu", torch="t", git_sha="abc",
                      speedup_vs_reference="", peak_mem_bytes=0)
        report.plot([dict(common, op="gram", provider="repkern", median_ms=1.0),
                     dict(common, op="gram", provider="reference", median_ms=2.0)])
        print(matplotlib.get_backend(), plt.get_fignums() == [users.number])
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(repkern.__file__)), env.get("PYTHONPATH", "")])
    env.pop("MPLBACKEND", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["pdf", "True"]
    assert (tmp_path / "cka.png").read_bytes()[:4] == b"\x89PNG"
