"""Figures are written and have the expected content size (not pixel-exact)."""

import pytest
import torch

pytest.importorskip("matplotlib")

from repkern import plots  # noqa: E402


def test_cka_heatmap_writes_png(tmp_path):
    m = torch.rand(3, 4)
    m[1, 2] = float("nan")
    path = plots.cka_heatmap(m, ["a", "b", "c"], ["w", "x", "y", "z"], str(tmp_path / "cka.png"), title="t")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="labels"):
        plots.cka_heatmap(m, ["a"], ["w"], str(tmp_path / "bad.png"))


def test_sparsity_profiles_writes_png(tmp_path):
    profiles = {"in-dist": {"hoyer": [0.1, 0.2, 0.3], "l0": [1, 2, 3]}, "shuffled": {"hoyer": [0.2, 0.1, 0.4], "l0": [3, 2, 1]}}
    path = plots.sparsity_profiles(profiles, ["emb", "l1", "l2"], str(tmp_path / "s.png"))
    assert open(path, "rb").read()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="expected 2 layers"):
        plots.sparsity_profiles(profiles, ["emb", "l1"], str(tmp_path / "bad.png"))
