"""perturbation_sensitivity on a small MLP: the documented noise, scale 0, monotone decay, the caller's model
left bit-identical, seeds, saving and plotting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repkern
from repkern import workflows

SCALES = [0.0, 0.05, 0.2, 0.5, 1.0]
LAYERS = ["1", "3", "4"]


def mlp(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def batches(n: int = 64, seed: int = 1) -> list:
    return list(torch.randn(n, 6, generator=torch.Generator().manual_seed(seed)).split(16))


def state(model: nn.Module) -> dict:
    return {name: t.clone() for name, t in model.state_dict().items()}


def assert_bit_identical(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, t in after.items():
        assert t.dtype == before[name].dtype and torch.equal(t.view(torch.uint8), before[name].view(torch.uint8)), name


def test_scale_zero_is_the_model_itself_and_noise_lowers_similarity():
    model = mlp()
    result = repkern.perturbation_sensitivity(model, batches(), LAYERS, SCALES, progress=False)
    assert result.values.shape == (3, 5, 3) and result.values.dtype == torch.float64
    assert (result.layers, result.scales, result.metric, result.draws) == (LAYERS, SCALES, "cka", 3)
    assert (result.samples, result.batches, result.seed, result.pool) == (64, 4, 0, "mean")
    assert torch.equal(result.values[:, 0], torch.ones(3, 3, dtype=torch.float64))  # the same rows: exactly 1
    torch.testing.assert_close(result.mean, result.values.mean(-1))
    assert (result.mean.diff(dim=1) < 0).all(), result.mean  # more noise, less similar (every layer)
    distance = repkern.perturbation_sensitivity(model, batches(), LAYERS, SCALES, metric="shape_distance", draws=2,
                                                progress=False)
    assert torch.equal(distance.values[:, 0], torch.zeros(3, 2, dtype=torch.float64))
    assert (distance.mean.diff(dim=1) > 0).all(), distance.mean  # a distance grows
    tiny = repkern.perturbation_sensitivity(model, batches(), LAYERS, [1e-4], metric="shape_distance", draws=1,
                                            progress=False)
    assert ((tiny.values > 0) & (tiny.values < 1e-2)).all(), tiny.values  # perturbed, but barely


def test_the_noise_is_the_documented_one(monkeypatch):
    """Records what reaches similarity_matrix: the first layer is a bias-free Linear fed the identity, so its
    rows are the perturbed weight's columns."""
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Tanh(), nn.Linear(3, 2))
    w0 = model[0].weight.detach().clone()
    seen = []
    real = workflows.similarity_matrix
    monkeypatch.setattr(workflows, "similarity_matrix",
                        lambda xs, ys, **kw: (seen.append((xs[0], ys[0])), real(xs, ys, **kw))[1])
    scales, seed = [0.0, 0.3], 7
    repkern.perturbation_sensitivity(model, [torch.eye(4)], ["0"], scales, draws=2, seed=seed, progress=False)
    rms = float(w0.double().square().mean().sqrt())
    for index, (original, perturbed) in enumerate(seen):
        draw, scale = divmod(index, len(scales))
        z = torch.randn(w0.shape, generator=torch.Generator().manual_seed(seed + draw))  # first parameter's noise
        assert torch.equal(original, w0.T)
        assert torch.equal(perturbed, (w0 + z * (scales[scale] * rms)).T)
    assert len(seen) == 4


def test_the_callers_model_is_left_bit_identical_and_its_mode_restored():
    model = mlp().train()
    model[2].weight.requires_grad_(False)
    before = state(model)
    params = list(model.parameters())
    repkern.perturbation_sensitivity(model, batches(), LAYERS, [0.0, 1.0], draws=2, progress=False)
    assert_bit_identical(model, before)
    assert model.training and [p.requires_grad for p in model.parameters()] == [True, True, False, True, True, True]
    assert all(a is b for a, b in zip(params, model.parameters()))
    # an error after the first perturbation (cka's kernel is checked when it computes) restores the weights too
    with pytest.raises(ValueError, match="kernel"):
        repkern.perturbation_sensitivity(model, batches(), LAYERS, [0.5], kernel="cubic", progress=False)
    assert_bit_identical(model, before)


def test_original_activations_are_computed_once_and_the_batches_read_once():
    model, calls = mlp(), []
    model.register_forward_hook(lambda *_: calls.append(1))
    model[0].register_forward_hook(lambda *_: calls.append(0))
    once = iter(batches())  # an iterator: a second pass over the loader would see nothing
    result = repkern.perturbation_sensitivity(model, once, ["0"], [0.0, 0.1, 0.2], draws=2, progress=False)
    assert calls.count(0) == 4 * (1 + 2 * 2) and calls.count(1) == 0  # stops after layer 0; scale 0 runs no pass
    assert result.batches == 4 and torch.isfinite(result.values).all()


def test_seeds_reproduce_and_differ():
    model = mlp()
    run = lambda seed: repkern.perturbation_sensitivity(model, batches(), LAYERS, [0.1, 0.5], draws=2, seed=seed,
                                                        progress=False).values
    first = run(3)
    assert torch.equal(run(3), first)
    assert not torch.equal(run(4), first)
    torch.testing.assert_close(run(4)[..., 0], first[..., 1])  # draw d uses seed + d


def test_knn_metric_options_and_max_samples():
    model = mlp()
    result = repkern.perturbation_sensitivity(model, batches(), ["3"], [0.0, 0.5], metric="mutual_knn", k=5,
                                              knn_metric="euclidean", draws=1, progress=False)
    assert result.options == {"k": 5, "knn_metric": "euclidean", "tile_bytes": None}
    assert result.values[0, 0, 0] == 1.0 and result.values[0, 1, 0] < 1.0
    with pytest.raises(ValueError, match="max_samples: metric='mutual_knn' keeps every row .* max_samples=63"):
        repkern.perturbation_sensitivity(model, batches(), ["3"], [0.5], metric="mutual_knn", k=5, max_samples=63,
                                         progress=False)
    with pytest.raises(ValueError, match="k"):  # checked on the unperturbed rows, before any draw
        repkern.perturbation_sensitivity(model, batches(), ["3"], [0.5], metric="mutual_knn", k=64, progress=False)


def test_argument_errors():
    model = mlp()
    with pytest.raises(ValueError, match="scales: no noise scales"):
        repkern.perturbation_sensitivity(model, batches(), LAYERS, [])
    with pytest.raises(ValueError, match="scales: expected finite numbers >= 0"):
        repkern.perturbation_sensitivity(model, batches(), LAYERS, [0.1, -0.1])
    with pytest.raises(TypeError, match="scales: expected a sequence"):
        repkern.perturbation_sensitivity(model, batches(), LAYERS, 0.1)
    with pytest.raises(ValueError, match="draws: expected >= 1"):
        repkern.perturbation_sensitivity(model, batches(), LAYERS, [0.1], draws=0)
    with pytest.raises(ValueError, match="seed: expected >= 0"):
        repkern.perturbation_sensitivity(model, batches(), LAYERS, [0.1], seed=-1)
    with pytest.raises(TypeError, match=r"k: perturbation_sensitivity\(metric='cknna'\) needs the option k"):
        repkern.perturbation_sensitivity(model, batches(), LAYERS, [0.1], metric="cknna")
    with pytest.raises(ValueError, match="dataloader: yielded no batches"):
        repkern.perturbation_sensitivity(model, [], LAYERS, [0.1])


def test_result_round_trips_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    result = repkern.perturbation_sensitivity(mlp(), batches(), LAYERS, [0.0, 0.3, 1.0], metric="rsa", draws=2,
                                              seed=5, progress=False)
    path = result.save(tmp_path / "sub" / "perturbation")
    again = repkern.load_result(path)
    assert isinstance(again, repkern.PerturbationResult)
    assert torch.equal(again.values, result.values) and again.scales == [0.0, 0.3, 1.0] and again.seed == 5
    assert (again.layers, again.metric, again.options, again.draws) == (LAYERS, "rsa", result.options, 2)
    fig = again.plot(tmp_path / "perturbation.png")
    assert isinstance(fig, Figure) and (tmp_path / "perturbation.png").read_bytes()[:4] == b"\x89PNG"
    assert len(fig.axes[0].lines) == 3 and fig.axes[0].get_ylabel() == "rsa similarity to the unperturbed model"
    assert list(fig.axes[0].lines[1].get_ydata()) == pytest.approx(result.mean[1].tolist())
    mine = Figure()
    assert result.plot(ax=mine.subplots()) is mine
