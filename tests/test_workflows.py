"""compare_models / profile_sparsity on tiny models against the ops on activations collected by
hand; saved results round-trip; plots; argument errors."""

from __future__ import annotations

import builtins

import pytest
import torch
from torch import nn
from typing_extensions import TypedDict, Unpack

import repkern
from repkern.results.workflows import plot_sparsity_profiles

VOCAB, D = 50, 8


class Block(nn.Module):
    """Residual MLP returning (hidden, extra) like a transformer layer."""

    def __init__(self, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Dropout(dropout))

    def forward(self, h):
        return h + self.mlp(h), h.sum()


class TinyEncoder(nn.Module):
    """HF-like: forward(input_ids, attention_mask) -> (hidden, extra); blocks return tuples."""

    def __init__(self, seed: int, dropout: float = 0.0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embed = nn.Embedding(VOCAB, D)
            self.blocks = nn.ModuleList(Block(dropout) for _ in range(3))
        self.forward_calls = 0

    def hidden_states(self, input_ids):
        """Every block's output (batch, seq, D), computed without hooks: the hand-made oracle."""
        h, out = self.embed(input_ids), []
        for block in self.blocks:
            h = block(h)[0]
            out.append(h)
        return out

    def forward(self, input_ids, attention_mask=None):
        self.forward_calls += 1
        return self.hidden_states(input_ids)[-1], attention_mask


def make_batches(num_batches=3, batch=5, seq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        lengths = torch.randint(1, seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()  # right padding
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def by_hand(model, batches, pool):
    """Per block: the pooled rows of all batches concatenated, computed from the model directly."""
    layers = [[] for _ in model.blocks]
    with torch.no_grad():
        for b in batches:
            mask = b["attention_mask"].bool()
            for i, h in enumerate(model.hidden_states(b["input_ids"])):
                if pool == "all":
                    layers[i].append(h[mask])
                else:  # mean
                    layers[i].append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    return [torch.cat(rows) for rows in layers]


LAYERS = "blocks.*"
NAMES = ["blocks.0", "blocks.1", "blocks.2"]


# ---- profile_sparsity -------------------------------------------------------------------------


def test_profile_sparsity_equals_sparsity_stats_of_hand_collected_tokens():
    model, batches = TinyEncoder(0), make_batches()
    profile = repkern.profile_sparsity(model, batches, LAYERS, eps=0.1, progress=False)
    assert profile.layers == NAMES and profile.batches == 3 and profile.pool == "all"
    for name, acts in zip(NAMES, by_hand(model, batches, "all")):
        got, want = profile.stats[name], repkern.sparsity_stats(acts, eps=0.1)
        assert got.rows == acts.shape[0] == int(sum(b["attention_mask"].sum() for b in batches))
        assert torch.equal(got.fire_count, want.fire_count)
        for field in ("mean", "var", "min", "max", "frequency"):
            torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.row_mean["hoyer"], want.hoyer.double().mean(), rtol=1e-5, atol=1e-7)
    summary = profile.summary()
    hoyer_by_hand = [float(repkern.sparsity_stats(a).hoyer.double().mean()) for a in by_hand(model, batches, "all")]
    assert summary["hoyer"] == pytest.approx(hoyer_by_hand, rel=1e-5)
    l0_by_hand = [float((a.abs() > 0.1).double().mean()) for a in by_hand(model, batches, "all")]
    assert summary["l0_fraction"] == pytest.approx(l0_by_hand, rel=1e-6)


def test_profile_sparsity_mean_pool_and_model_mode_restored():
    model = TinyEncoder(1, dropout=0.5).train()
    batches = make_batches(2)
    profile = repkern.profile_sparsity(model, batches, [model.blocks[1]], pool="mean", progress=False)
    assert model.training  # restored
    acts = by_hand(model.eval(), batches, "mean")[1]  # dropout off in the oracle too: eval mode was used
    assert profile.stats["blocks.1"].rows == 10
    torch.testing.assert_close(profile.stats["blocks.1"].mean, acts.mean(0), rtol=1e-5, atol=1e-6)


def test_profile_sparsity_errors_before_running_the_model():
    model = TinyEncoder(0)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        repkern.profile_sparsity("bert", make_batches(), LAYERS)
    with pytest.raises(TypeError, match="dataloader: expected an iterable"):
        repkern.profile_sparsity(model, torch.zeros(3, 4), LAYERS)
    with pytest.raises(TypeError, match="progress"):
        repkern.profile_sparsity(model, make_batches(), LAYERS, progress="yes")
    with pytest.raises(ValueError, match="eps"):
        repkern.profile_sparsity(model, make_batches(), LAYERS, eps=-1.0)
    with pytest.raises(ValueError, match="layers: 'decoder' matches no module"):
        repkern.profile_sparsity(model, make_batches(), "decoder")
    with pytest.raises(TypeError, match="device: profile_sparsity accumulates on the model's device"):
        repkern.profile_sparsity(model, make_batches(), LAYERS, device="cpu")
    assert model.forward_calls == 0
    with pytest.raises(ValueError, match="dataloader: yielded no batches"):
        repkern.profile_sparsity(model, [], LAYERS)


def test_progress_bar_shown_and_optional(capsys, monkeypatch):
    pytest.importorskip("tqdm")
    model, batches = TinyEncoder(0), make_batches(2)
    repkern.profile_sparsity(model, batches, LAYERS, progress=True)
    assert "profile_sparsity" in capsys.readouterr().err
    repkern.profile_sparsity(model, batches, LAYERS, progress=False)
    assert capsys.readouterr().err == ""
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    profile = repkern.profile_sparsity(model, batches, LAYERS, progress=True)  # falls back silently
    assert profile.batches == 2 and capsys.readouterr().err == ""


def test_batches_as_tensors_and_tuples():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(12, 4)
    from_tensors = repkern.profile_sparsity(model, list(x.split(5)), "1", progress=False)
    from_tuples = repkern.profile_sparsity(model, [(chunk,) for chunk in x.split(4)], "1", progress=False)
    want = repkern.sparsity_stats(torch.relu(model[0](x)).detach())
    for profile in (from_tensors, from_tuples):
        torch.testing.assert_close(profile.stats["1"].mean, want.mean)
        assert torch.equal(profile.stats["1"].fire_count, want.fire_count)


class NoMask(TinyEncoder):
    """A forward without attention_mask: the mask still pools, but is not passed on."""

    def forward(self, input_ids):
        self.forward_calls += 1
        return self.hidden_states(input_ids)[-1]


class TakesAll(TinyEncoder):
    def forward(self, input_ids, **kwargs):
        self.seen = sorted(kwargs)
        return super().forward(input_ids, kwargs.get("attention_mask"))


class Options(TypedDict, total=False):
    output_attentions: bool


class TypedKwargs(TakesAll):
    """Hugging Face models' form: forward(..., **kwargs: Unpack[TransformersKwargs])."""

    def forward(self, input_ids, attention_mask=None, **kwargs: Unpack[Options]):
        return super().forward(input_ids, attention_mask=attention_mask, **kwargs)


def test_dict_batches_pass_only_the_keys_forward_takes():
    batches = make_batches()
    extra = [{**b, "text": ["a sentence"] * 5, "labels": torch.zeros(5), "idx": 3} for b in batches]
    want = repkern.profile_sparsity(TinyEncoder(0), batches, LAYERS, progress=False).summary()
    assert repkern.profile_sparsity(TinyEncoder(0), extra, LAYERS, progress=False).summary() == want
    no_mask = repkern.profile_sparsity(NoMask(0), extra, LAYERS, progress=False)
    assert no_mask.summary() == want and no_mask.stats["blocks.0"].rows == sum(int(b["attention_mask"].sum())
                                                                               for b in batches)
    takes_all = TakesAll(0)
    result = repkern.compare_models(takes_all, None, extra, LAYERS, progress=False)
    assert takes_all.seen == ["attention_mask", "idx", "labels", "text"]  # **kwargs: every key
    typed = TypedKwargs(0)
    repkern.profile_sparsity(typed, [{**b, "output_attentions": False} for b in extra], LAYERS, progress=False)
    assert typed.seen == ["attention_mask", "output_attentions"]
    torch.testing.assert_close(result.matrix, repkern.compare_models(TinyEncoder(0), None, batches, LAYERS,
                                                                     progress=False).matrix)
    with pytest.raises(TypeError, match=r"dataloader: a batch with keys \['attention_mask', 'tokens'\] lacks "
                                        r"\['input_ids'\], which NoMask.forward requires"):
        repkern.profile_sparsity(NoMask(0), [{"tokens": b["input_ids"], "attention_mask": b["attention_mask"]}
                                             for b in batches], LAYERS, progress=False)


class Elsewhere(torch.Tensor):
    """Stands in for a layer output on another device (a device_map model's later layers): records the
    arguments of each ``.to`` and turns into a plain tensor there."""

    moved_to: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if func is torch.Tensor.to:
            cls.moved_to.append(args[1:])
            return out.as_subclass(torch.Tensor)
        return out


class SpreadOut(TinyEncoder):
    def __init__(self, seed):
        super().__init__(seed)
        self.blocks[2].register_forward_hook(lambda _m, _i, out: (out[0].as_subclass(Elsewhere), out[1]))


class Accumulated:
    """Records the types of the activations that reach SparsityAccumulator.update."""

    def __init__(self, monkeypatch):
        self.types = set()
        update = repkern.SparsityAccumulator.update
        monkeypatch.setattr(repkern.SparsityAccumulator, "update",
                            lambda acc, x, *a, **k: (self.types.add(type(x)), update(acc, x, *a, **k))[1])


def test_activations_are_moved_to_the_accumulators_device(monkeypatch):
    batches = make_batches()
    want = repkern.profile_sparsity(TinyEncoder(0), batches, LAYERS, progress=False).summary()
    seen = Accumulated(monkeypatch)
    Elsewhere.moved_to = []
    assert repkern.profile_sparsity(SpreadOut(0), batches, LAYERS, progress=False).summary() == want
    assert Elsewhere.moved_to == [(torch.device("cpu"),)] * 3 and seen.types == {torch.Tensor}
    Elsewhere.moved_to = []
    result = repkern.compare_models(SpreadOut(0), None, batches, LAYERS, progress=False)
    assert Elsewhere.moved_to == [(torch.device("cpu"),)] * 3
    torch.testing.assert_close(result.matrix, repkern.compare_models(TinyEncoder(0), None, batches, LAYERS,
                                                                     progress=False).matrix)


def test_workflows_stop_after_the_last_requested_layer():
    a, batches = TinyEncoder(4), make_batches()
    want = repkern.compare_models(a, None, batches, ["blocks.0", "blocks.1"], progress=False)
    a.blocks[2].register_forward_pre_hook(lambda *_: pytest.fail("blocks.2 ran"))
    a.forward_calls = 0
    same = repkern.compare_models(a, None, batches, ["blocks.0", "blocks.1"], progress=False)
    torch.testing.assert_close(same.matrix, want.matrix)
    other_layers = repkern.compare_models(a, a, batches, "blocks.1", "blocks.0", progress=False)  # one pass for both
    torch.testing.assert_close(other_layers.matrix, want.matrix[1:, :1])
    assert a.forward_calls == 6
    repkern.compare_models(a, TinyEncoder(5), batches, "blocks.0", "blocks.1", progress=False)
    repkern.profile_sparsity(a, batches, "blocks.1", progress=False)


# ---- saving, loading, plotting ----------------------------------------------------------------


def test_sparsity_profile_round_trips(tmp_path):
    model, batches = TinyEncoder(2), make_batches()
    profile = repkern.profile_sparsity(model, batches, LAYERS, top_p=(0.25,), progress=False)
    path = profile.save(tmp_path / "sub" / "sparsity")
    assert path == str(tmp_path / "sub" / "sparsity.json") and (tmp_path / "sub" / "sparsity.pt").exists()
    again = repkern.load_result(path)
    assert isinstance(again, repkern.SparsityProfile) and again.layers == profile.layers
    assert again.pool == "all" and again.batches == 3
    for name in NAMES:
        a, b = profile.stats[name].to_dict(), again.stats[name].to_dict()
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value.nan_to_num(-7), b[key].nan_to_num(-7)), key
            else:
                assert value == b[key], key
    assert again.summary() == profile.summary()
    assert "top25%_l1" in again.summary()


def test_cka_result_round_trips_with_nan(tmp_path):
    matrix = torch.tensor([[1.0, 0.5], [float("nan"), 0.25], [0.1, 0.9]])
    result = repkern.CkaResult(matrix=matrix, layers_a=["a0", "a1", "a2"], layers_b=["b0", "b1"], kernel="linear",
                               debiased=True, estimator="exact", pool="mean", samples=40, batches=4)
    path = result.save(str(tmp_path / "cka.json"))
    import json

    document = json.load(open(path))
    assert document["type"] == "cka" and document["matrix"][1] == [None, 0.25]
    again = repkern.load_result(tmp_path / "cka")
    assert torch.equal(again.matrix.nan_to_num(-1), matrix.nan_to_num(-1))
    assert again.layers_a == ["a0", "a1", "a2"] and again.debiased and again.samples == 40


def test_load_result_rejects_other_json(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a saved repkern result"):
        repkern.load_result(tmp_path / "x.json")


def test_result_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    result = repkern.CkaResult(matrix=torch.rand(3, 3), layers_a=NAMES, layers_b=NAMES, kernel="linear",
                               debiased=False, estimator="exact", pool="mean", samples=9, batches=1)
    assert isinstance(result.plot(tmp_path / "cka.png"), Figure)
    assert (tmp_path / "cka.png").read_bytes()[:4] == b"\x89PNG"
    assert result.plot().axes[0].get_title() == "linear CKA (exact)"  # no path: only the figure
    model = TinyEncoder(3)
    a = repkern.profile_sparsity(model, make_batches(seed=1), LAYERS, progress=False)
    b = repkern.profile_sparsity(model, make_batches(seed=2), LAYERS, progress=False)
    fig = plot_sparsity_profiles({"set a": a, "set b": b}, tmp_path / "profiles.png")
    assert [len(ax.lines) for ax in fig.axes] == [2, 2, 2, 2] and (tmp_path / "profiles.png").exists()
    assert len(a.plot(tmp_path / "one.png", metrics=["hoyer"]).axes) == 1
    assert (tmp_path / "one.png").read_bytes()[:4] == b"\x89PNG"
    mine = Figure()
    left, right = mine.subplots(1, 2)
    assert result.plot(ax=left) is mine and len(left.images) == 1
    assert a.plot(ax=right, metrics=["l0_fraction"]) is mine and right.get_title() == "l0_fraction"
    c = repkern.profile_sparsity(model, make_batches(), "blocks.0", progress=False)
    with pytest.raises(ValueError, match=r"profiles\['c'\]: layers"):
        plot_sparsity_profiles({"a": a, "c": c}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="metrics: 'kurtosis'"):
        plot_sparsity_profiles({"a": a}, tmp_path / "bad.png", metrics=["kurtosis"])


# ---- compare_models ---------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
def test_compare_models_exact_equals_cka_matrix_on_hand_collected_activations(debiased):
    a, b, batches = TinyEncoder(0), TinyEncoder(1), make_batches()
    self_result = repkern.compare_models(a, None, batches, LAYERS, debiased=debiased, progress=False)
    want = repkern.cka_matrix(by_hand(a, batches, "mean"), debiased=debiased)
    torch.testing.assert_close(self_result.matrix, want, rtol=1e-5, atol=1e-6)
    assert (self_result.layers_a, self_result.layers_b) == (NAMES, NAMES)
    assert (self_result.samples, self_result.batches, self_result.estimator) == (15, 3, "exact")
    assert self_result.debiased is debiased
    cross = repkern.compare_models(a, b, batches, LAYERS, ["blocks.2", "blocks.0"], pool="all", debiased=debiased,
                                   progress=False)
    tokens_b = by_hand(b, batches, "all")
    want = repkern.cka_matrix(by_hand(a, batches, "all"), [tokens_b[0], tokens_b[2]], debiased=debiased)
    torch.testing.assert_close(cross.matrix, want, rtol=1e-5, atol=1e-6)  # layers in the model's order
    assert cross.layers_b == ["blocks.0", "blocks.2"] and cross.samples == sum(int(x["attention_mask"].sum())
                                                                                for x in batches)


def test_compare_models_same_model_other_layers_runs_it_once():
    a, batches = TinyEncoder(2), make_batches()
    result = repkern.compare_models(a, a, batches, "blocks.0", LAYERS, progress=False)
    assert a.forward_calls == 3
    acts = by_hand(a, batches, "mean")
    torch.testing.assert_close(result.matrix, repkern.cka_matrix(acts[:1], acts), rtol=1e-5, atol=1e-6)


def test_compare_models_minibatch_is_the_per_batch_unbiased_hsic_ratio():
    a, b, batches = TinyEncoder(0), TinyEncoder(3), make_batches(batch=6)
    result = repkern.compare_models(a, b, batches, "blocks.1", "blocks.2", estimator="minibatch", progress=False)
    assert result.debiased and result.estimator == "minibatch"  # the estimator's default
    xy = xx = yy = 0.0
    for batch in batches:
        x, y = by_hand(a, [batch], "mean")[1].double(), by_hand(b, [batch], "mean")[2].double()
        xy += repkern.reference.hsic(x, y, debiased=True)
        xx += repkern.reference.hsic(x, x, debiased=True)
        yy += repkern.reference.hsic(y, y, debiased=True)
    torch.testing.assert_close(result.matrix.double(), (xy / (xx * yy).sqrt()).reshape(1, 1), rtol=1e-5, atol=1e-6)
    rbf = repkern.compare_models(a, b, batches, "blocks.1", "blocks.2", kernel="rbf", estimator="minibatch",
                                 progress=False)
    assert rbf.kernel == "rbf" and torch.isfinite(rbf.matrix).all()


def test_compare_models_errors():
    a, b, batches = TinyEncoder(0), TinyEncoder(1), make_batches()
    with pytest.raises(ValueError, match="kernel: the exact streaming estimator is linear only"):
        repkern.compare_models(a, b, batches, LAYERS, kernel="rbf")
    with pytest.raises(ValueError, match="estimator: expected one of"):
        repkern.compare_models(a, b, batches, LAYERS, estimator="approximate")
    with pytest.raises(TypeError, match="model_b: expected a torch.nn.Module"):
        repkern.compare_models(a, "b", batches, LAYERS)
    with pytest.raises(TypeError, match="debiased: expected a bool"):
        repkern.compare_models(a, b, batches, LAYERS, debiased="yes")
    with pytest.raises(ValueError, match="dataloader: yielded no batches"):
        repkern.compare_models(a, b, [], LAYERS, progress=False)
    assert a.forward_calls == b.forward_calls == 0

    class Twice(nn.Module):
        def forward(self, x):
            return torch.cat([x, x])

    rows_a, rows_b = nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(4, 3), Twice())
    with pytest.raises(ValueError, match="dataloader: batch 0 gave 5 rows in model_a and 10 in model_b"):
        repkern.compare_models(rows_a, rows_b, [torch.randn(5, 4)], "0", "1", progress=False)


# ---- compare_models with the other alignment metrics ----------------------------------------------

METRIC_OPTIONS = [("mutual_knn", {"k": 3}), ("mutual_knn", {"k": 4, "knn_metric": "euclidean"}),
                  ("cycle_knn", {"k": 3}), ("cknna", {"k": 4}), ("shape_distance", {}),
                  ("shape_distance", {"alpha": 0.5, "score": "euclidean"}), ("svcca", {"dims": 4}), ("pwcca", {}),
                  ("rsa", {}), ("rsa", {"rdm": "euclidean", "compare": "pearson"})]


@pytest.mark.parametrize("metric,options", METRIC_OPTIONS)
def test_compare_models_metric_equals_similarity_matrix_on_hand_collected_activations(metric, options):
    a, b, batches = TinyEncoder(0), TinyEncoder(1), make_batches()
    cross = repkern.compare_models(a, b, batches, LAYERS, ["blocks.2", "blocks.0"], metric=metric, progress=False,
                                   **options)
    acts_a, acts_b = by_hand(a, batches, "mean"), by_hand(b, batches, "mean")
    want = repkern.similarity_matrix(acts_a, [acts_b[0], acts_b[2]], metric=metric, **options)
    assert isinstance(cross, repkern.AlignmentResult) and cross.metric == metric
    torch.testing.assert_close(cross.matrix, want, rtol=1e-5, atol=1e-6)
    assert (cross.layers_a, cross.layers_b, cross.samples, cross.batches) == (NAMES, ["blocks.0", "blocks.2"], 15, 3)
    assert options.items() <= cross.options.items()  # the given options, and the defaults of the others
    same = repkern.compare_models(a, None, batches, LAYERS, metric=metric, progress=False, **options)
    torch.testing.assert_close(same.matrix, repkern.similarity_matrix(acts_a, metric=metric, **options),
                               rtol=1e-5, atol=1e-6)


def test_compare_models_knn_on_tokens_and_the_max_samples_limit():
    a, b, batches = TinyEncoder(0), TinyEncoder(1), make_batches()
    tokens = sum(int(x["attention_mask"].sum()) for x in batches)
    result = repkern.compare_models(a, b, batches, "blocks.1", metric="cknna", pool="all", k=5, max_samples=tokens,
                                    progress=False)  # exactly max_samples rows: allowed
    want = repkern.similarity_matrix(by_hand(a, batches, "all")[1:2], by_hand(b, batches, "all")[1:2], metric="cknna",
                                     k=5)
    torch.testing.assert_close(result.matrix, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=rf"max_samples: metric='cknna' keeps every row .* more than "
                                         rf"max_samples={tokens - 1} rows \(pool='all'\)"):
        repkern.compare_models(a, b, batches, "blocks.1", metric="cknna", pool="all", k=5, max_samples=tokens - 1,
                               progress=False)
    with pytest.raises(ValueError, match="max_samples=14 rows"):
        repkern.compare_models(a, None, batches, LAYERS, metric="rsa", max_samples=14, progress=False)
    # streamed metrics keep no rows: no limit
    repkern.compare_models(a, None, batches, LAYERS, metric="svcca", max_samples=1, progress=False)


def test_compare_models_keeps_a_layer_in_both_lists_once(monkeypatch):
    """Same model, overlapping layer lists: the shared layer's rows reach similarity_matrix as one tensor (held
    once, its neighbours found once), and the result equals similarity_matrix on the hand-collected rows."""
    a, batches = TinyEncoder(0), make_batches()
    seen = []
    real = repkern.workflows.similarity_matrix

    def spy(xs, ys=None, **kwargs):
        seen.append((list(xs), list(ys)))
        return real(xs, ys, **kwargs)

    monkeypatch.setattr(repkern.workflows, "similarity_matrix", spy)
    result = repkern.compare_models(a, None, batches, ["blocks.0", "blocks.1"], ["blocks.1", "blocks.2"],
                                    metric="mutual_knn", k=3, progress=False)
    (xs, ys), = seen
    assert xs[1] is ys[0] and xs[0] is not ys[1]
    acts = by_hand(a, batches, "mean")
    torch.testing.assert_close(result.matrix, real(acts[:2], acts[1:], metric="mutual_knn", k=3), rtol=1e-5,
                               atol=1e-6)


def test_compare_models_metric_errors_before_running_the_models():
    a, b, batches = TinyEncoder(0), TinyEncoder(1), make_batches()
    with pytest.raises(ValueError, match="metric: expected one of"):
        repkern.compare_models(a, b, batches, LAYERS, metric="cca")
    with pytest.raises(TypeError, match=r"k: compare_models\(metric='mutual_knn'\) needs the option k"):
        repkern.compare_models(a, b, batches, LAYERS, metric="mutual_knn")
    with pytest.raises(TypeError, match=r"sigma: not an option of compare_models\(metric='rsa'\)"):
        repkern.compare_models(a, b, batches, LAYERS, metric="rsa", sigma=1.0)
    with pytest.raises(TypeError, match="kernel, debiased, estimator: settings of metric='cka' only"):
        repkern.compare_models(a, b, batches, LAYERS, metric="shape_distance", debiased=True)
    with pytest.raises(ValueError, match="score"):
        repkern.compare_models(a, b, batches, LAYERS, metric="shape_distance", score="cosine")
    with pytest.raises(ValueError, match="max_samples: expected >= 1"):
        repkern.compare_models(a, b, batches, LAYERS, metric="mutual_knn", k=3, max_samples=0)
    with pytest.raises(TypeError, match="max_samples: expected an int or None"):
        repkern.compare_models(a, b, batches, LAYERS, max_samples=1.5)
    assert a.forward_calls == b.forward_calls == 0


def test_alignment_result_round_trips_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    a, batches = TinyEncoder(0), make_batches()
    result = repkern.compare_models(a, None, batches, LAYERS, metric="svcca", dims=(3, 2), progress=False)
    path = result.save(tmp_path / "svcca")
    again = repkern.load_result(path)
    assert isinstance(again, repkern.AlignmentResult) and again.metric == "svcca"
    assert again.options == {"dims": [3, 2], "keep": 0.99} and again.layers_a == NAMES and again.samples == 15
    assert torch.equal(again.matrix, result.matrix)
    fig = again.plot(tmp_path / "svcca.png")
    assert isinstance(fig, Figure) and (tmp_path / "svcca.png").read_bytes()[:4] == b"\x89PNG"
    assert fig.axes[0].get_title() == "svcca (dims=[3, 2])" and fig.axes[1].get_ylabel() == "svcca"
    distance = repkern.compare_models(a, None, batches, LAYERS, metric="shape_distance", progress=False)
    image = distance.plot().axes[0].images[0]
    assert image.get_cmap().name == "magma_r" and image.get_clim() == pytest.approx((0.0, torch.pi / 2))
    assert "distance: lower = more similar" in distance.plot().axes[0].get_title()
    rsa = repkern.AlignmentResult(matrix=torch.tensor([[1.0, -0.5]]), layers_a=["a"], layers_b=["b", "c"],
                                  metric="rsa", options={}, pool="mean", samples=9, batches=1)
    assert rsa.plot().axes[0].images[0].get_clim() == (-1.0, 1.0)
    mine = Figure()
    assert distance.plot(ax=mine.subplots()) is mine
    cka = repkern.compare_models(a, None, batches, LAYERS, progress=False)
    assert cka.metric == "cka" and repkern.load_result(cka.save(tmp_path / "cka")).metric == "cka"
    document = (tmp_path / "svcca.json").read_text().replace('"svcca"', '"procrustes"')
    (tmp_path / "bad.json").write_text(document.replace("svcca.pt", "bad.pt"))
    (tmp_path / "bad.pt").write_bytes((tmp_path / "svcca.pt").read_bytes())
    with pytest.raises(ValueError, match="field 'metric' must name an alignment metric"):
        repkern.load_result(tmp_path / "bad.json")
