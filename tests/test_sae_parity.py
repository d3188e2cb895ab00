"""repkern.SAE against the packages people train SAEs with: SAELens, EleutherAI sparsify and
dictionary_learning. Each test builds a small SAE with the package's own classes (random weights,
so that no init symmetry hides a bug), saves it with the package's own save code, loads it with
repkern.SAE.load (or converts the live object), and compares encode, decode and forward with the
package's own methods. The packages are the `parity` extra; without them these tests skip."""

from __future__ import annotations

import importlib.util
import inspect
import json
import multiprocessing
import os

import pytest
import torch

import repkern
from repkern import SAE

D_IN, D_SAE, K = 16, 64, 6
TOL = dict(rtol=1e-5, atol=1e-5)  # float32; the folded decoder norms round differently from SAELens' product


def _package(name: str):
    return pytest.importorskip(name, reason=f"{name} is not installed (pip install 'repkern[parity]')")


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights of mixed scale: decoder rows of unequal norms, thresholds of both signs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.3 if "threshold" in name or name.endswith("b_enc") or "bias" in name else 1.0
            value = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
            if p.dim() == 2:  # rows of norm 0.2..5: a decoder-norm rescale that is dropped shows
                value = value * torch.logspace(-0.7, 0.7, p.shape[0], dtype=torch.float64)[:, None] / p.shape[1] ** 0.5
            p.copy_(value.to(p.dtype))


def _inputs(seed: int = 1, shape=(32,)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(*shape, D_IN, generator=g)


# ---- SAELens -----------------------------------------------------------------------------------


def _saelens_sae(architecture: str, training: bool = False, **cfg):
    _package("sae_lens")
    from sae_lens.registry import get_sae_class, get_sae_training_class

    cls, cfg_cls = (get_sae_training_class if training else get_sae_class)(architecture)
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **cfg))
    _randomize(sae)
    return sae


def _recons(sae, codes):
    """SAELens' reconstruction before its output normalization (hook_sae_recons), i.e. in the
    normalized space, where repkern's decode alone stays."""
    seen = []
    handle = sae.hook_sae_recons.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        sae.decode(codes)
    finally:
        handle.remove()
    return seen[0]


def _check_saelens(ours: SAE, theirs, x: torch.Tensor) -> None:
    with torch.no_grad():
        codes = theirs.encode(x)
        torch.testing.assert_close(ours.encode(x), codes, **TOL)
        if theirs.cfg.normalize_activations == "none":
            torch.testing.assert_close(ours.decode(codes), theirs.decode(codes), **TOL)
        else:  # SAELens' decode undoes the norm of its last encode; repkern's decode alone does not
            torch.testing.assert_close(ours.decode(codes), _recons(theirs, codes), **TOL)
        torch.testing.assert_close(ours(x), theirs(x), **TOL)


SAELENS_CASES = [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("topk", {"k": K}),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False}),
    ("jumprelu", {}),
    ("jumprelu", {"apply_b_dec_to_input": False}),
]
NORMALIZATIONS = ["none", "constant_norm_rescale", "layer_norm"]


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("architecture, cfg", SAELENS_CASES)
def test_saelens_saved_by_save_model(tmp_path, architecture, cfg, normalize):
    sae = _saelens_sae(architecture, normalize_activations=normalize, **cfg)
    sae.save_model(tmp_path)
    ours = SAE.load(tmp_path)
    _check_saelens(ours, sae, _inputs())
    _check_saelens(ours, sae, _inputs(shape=(2, 5)))  # leading batch dims
    _check_saelens(SAE.from_saelens(sae), sae, _inputs())


def test_saelens_topk_rescale_matches_in_float64(tmp_path):
    # The fold is exact: in float64 the codes agree to float64 rounding, not just float32 tolerance.
    sae = _saelens_sae("topk", k=K, rescale_acts_by_decoder_norm=True, dtype="float64")
    sae.save_model(tmp_path)
    ours, x = SAE.load(tmp_path), _inputs().double()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), sae.encode(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours(x), sae(x), rtol=1e-12, atol=1e-12)


TRAINING_CASES = [
    ("standard", {}),
    ("topk", {"k": K}),  # rescale_acts_by_decoder_norm=True: the training default
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": False}),
    ("jumprelu", {}),
    ("batchtopk", {"k": K}),
]


@pytest.mark.parametrize("architecture, cfg", TRAINING_CASES)
def test_saelens_training_sae(tmp_path, architecture, cfg):
    # A training checkpoint (save_model: the training config) encodes as the training SAE does;
    # save_inference_model writes the inference SAE (BatchTopK: a JumpReLU with its threshold),
    # compared with what SAELens' own load_from_disk makes of those files.
    sae = _saelens_sae(architecture, training=True, **cfg)
    from sae_lens import SAE as SAELensSAE

    if architecture == "jumprelu":  # training clamps θ >= 0 at every step
        sae.threshold.data.abs_()
    if architecture == "batchtopk":
        sae.topk_threshold = torch.tensor(0.4, dtype=torch.float64)
    sae.save_model(tmp_path / "training")
    _check_saelens(SAE.load(tmp_path / "training"), sae, _inputs())
    _check_saelens(SAE.from_saelens(sae), sae, _inputs())
    sae.save_inference_model(tmp_path / "inference")
    inference = SAELensSAE.load_from_disk(tmp_path / "inference")
    _check_saelens(SAE.load(tmp_path / "inference"), inference, _inputs())


def test_saelens_training_jumprelu_with_negative_threshold_is_an_error(tmp_path):
    # Its h·[h > θ] keeps codes in (θ, 0]; the inference SAE's (and repkern's) ReLU drops them.
    sae = _saelens_sae("jumprelu", training=True)
    sae.save_model(tmp_path)
    with pytest.raises(ValueError, match="threshold below 0"):
        SAE.load(tmp_path)


def test_saelens_metadata_is_kept(tmp_path):
    _package("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    sae = _saelens_sae("topk", k=K, metadata=SAEMetadata(hook_name="blocks.3.hook_resid_post", model_name="gpt2"))
    sae.save_model(tmp_path)
    for ours in (SAE.load(tmp_path), SAE.from_saelens(sae)):
        assert ours.metadata["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
        assert ours.metadata["architecture"] == "topk" and ours.metadata["k"] == K


@pytest.mark.parametrize("normalize", ["expected_average_only_in", "covariance_whitening"])
def test_saelens_unfolded_normalization_is_an_error(tmp_path, normalize):
    sae = _saelens_sae("standard", normalize_activations=normalize)
    sae.save_model(tmp_path)
    with pytest.raises(ValueError, match=normalize):
        SAE.load(tmp_path)
    with pytest.raises(ValueError, match=normalize):
        SAE.from_saelens(sae)


def _unsupported_saelens():
    try:
        from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
    except ImportError:
        return [pytest.param(None, None, marks=pytest.mark.skip(
            reason="sae_lens is not installed (pip install 'repkern[parity]')"))]
    supported = {"standard", "topk", "jumprelu", "batchtopk"}
    return ([(a, False) for a in SAE_CLASS_REGISTRY if a not in supported]
            + [(a, True) for a in SAE_TRAINING_CLASS_REGISTRY if a not in supported])


# What some architectures need to be built at d_in = 16 (SAELens checks these).
_BUILD = {"temporal": {"n_heads": 4, "bottleneck_factor": 4},
          "matryoshka_batchtopk": {"k": K, "matryoshka_widths": [D_SAE // 2, D_SAE]}}


@pytest.mark.parametrize("architecture, training", _unsupported_saelens())
def test_saelens_unsupported_architecture_is_an_error(tmp_path, architecture, training):
    cfg = dict(_BUILD.get(architecture, {}))
    if "transcoder" in architecture:  # SAELens' transcoders refuse apply_b_dec_to_input
        cfg["apply_b_dec_to_input"] = False
    sae = _saelens_sae(architecture, training=training, **cfg)
    sae.save_model(tmp_path)
    with pytest.raises(ValueError, match=f"unsupported architecture '{architecture}'"):
        SAE.load(tmp_path)
    with pytest.raises(ValueError, match=f"unsupported architecture '{architecture}'"):
        SAE.from_saelens(sae)


# ---- sparsify ----------------------------------------------------------------------------------


def _sparse_coder(k=K, **cfg):
    sparsify = _package("sparsify")
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=k, **cfg))
    _randomize(coder)
    return coder


def _check_sparsify(ours: SAE, coder, x: torch.Tensor) -> None:
    with torch.no_grad():
        top_acts, top_indices, _ = coder.encode(x)
        codes = torch.zeros(*x.shape[:-1], D_SAE).scatter(-1, top_indices, top_acts)
        torch.testing.assert_close(ours.encode(x), codes, **TOL)
        torch.testing.assert_close(ours.decode(codes), coder.decode(top_acts, top_indices), **TOL)
        torch.testing.assert_close(ours(x), coder(x).sae_out, **TOL)


@pytest.mark.parametrize("cfg", [{}, {"transcode": True}], ids=["sae", "transcoder"])
def test_sparsify(tmp_path, cfg):
    coder = _sparse_coder(**cfg)
    coder.save_to_disk(tmp_path)
    _check_sparsify(SAE.load(tmp_path), coder, _inputs())
    _check_sparsify(SAE.from_sparsify(coder), coder, _inputs())
    assert SAE.load(tmp_path).metadata["k"] == K


@pytest.mark.parametrize("cfg, flag", [({"skip_connection": True}, "skip_connection"),
                                       ({"activation": "groupmax", "k": 8}, "groupmax")])
def test_sparsify_unsupported_is_an_error(tmp_path, cfg, flag):
    coder = _sparse_coder(**cfg)
    coder.save_to_disk(tmp_path)
    with pytest.raises(ValueError, match=flag):
        SAE.load(tmp_path)
    with pytest.raises(ValueError, match=flag):
        SAE.from_sparsify(coder)


# ---- dictionary_learning -----------------------------------------------------------------------
# Importing dictionary_learning imports nnsight, which patches torch's FakeTensor for the whole process
# (torch.compile and opcheck in later test files then fail), so its cases run in a child process.


@pytest.fixture(scope="module")
def dictionary_learning_worker():
    if importlib.util.find_spec("dictionary_learning") is None:
        pytest.skip("dictionary_learning is not installed (pip install 'repkern[parity]')")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        yield pool


def _dictionary_learning_checkpoint(folder: str, trainer: str, dict_kwargs: dict):
    """Runs dictionary_learning's trainSAE for one step (which writes config.json and ae.pt); returns the
    checkpoint folder and the dictionary class it names."""
    import dictionary_learning.trainers as trainers
    from dictionary_learning import dictionary
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK
    from dictionary_learning.training import trainSAE

    trainer_cls = getattr(trainers, trainer)
    # Schedules shorter than the defaults' warm-ups, which the trainers require to fit in `steps`.
    schedule = dict(steps=10, warmup_steps=0)
    if "sparsity_warmup_steps" in inspect.signature(trainer_cls).parameters:
        schedule["sparsity_warmup_steps"] = 0
    config = dict(trainer=trainer_cls, activation_dim=D_IN, dict_size=D_SAE, layer=0, lm_name="test", device="cpu",
                  seed=0, **schedule, **dict_kwargs)
    trainSAE(iter([_inputs(seed=2)]), [config], steps=1, save_dir=folder, device="cpu")
    folder = os.path.join(folder, "trainer_0")
    with open(os.path.join(folder, "config.json")) as f:
        dict_class = json.load(f)["trainer"]["dict_class"]
    classes = {"AutoEncoderTopK": AutoEncoderTopK, "BatchTopKSAE": BatchTopKSAE}
    return folder, classes.get(dict_class) or getattr(dictionary, dict_class)


def _dictionary_learning_case(folder: str, trainer: str, dict_kwargs: dict, threshold) -> None:
    """In the worker: a checkpoint from trainSAE, its weights replaced by random ones written the way trainSAE
    saves them (the CPU state dict, torch.save), loaded by repkern and compared with the module."""
    folder, dict_class = _dictionary_learning_checkpoint(folder, trainer, dict_kwargs)
    state = torch.load(os.path.join(folder, "ae.pt"), weights_only=True)
    ae = dict_class(D_IN, D_SAE, K) if "k" in state else dict_class(D_IN, D_SAE)
    ae.load_state_dict(state)
    _randomize(ae)
    if threshold is not None:
        ae.threshold.fill_(threshold)
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, os.path.join(folder, "ae.pt"))
    ours = SAE.load(folder)
    assert ours.metadata["trainer"]["dict_class"] == dict_class.__name__
    for x in (_inputs(), _inputs(shape=(3, 4))):
        with torch.no_grad():
            codes = ae.encode(x)
            torch.testing.assert_close(ours.encode(x), codes, **TOL)
            torch.testing.assert_close(ours.decode(codes), ae.decode(codes), **TOL)
            torch.testing.assert_close(ours(x), ae(x), **TOL)


def _dictionary_learning_unsupported_case(folder: str) -> str:
    folder, _ = _dictionary_learning_checkpoint(folder, "GatedSAETrainer", {})
    with pytest.raises(ValueError) as error:
        SAE.load(folder)
    return str(error.value)


@pytest.mark.parametrize("trainer, dict_kwargs, threshold", [
    ("StandardTrainer", {}, None),
    ("TopKTrainer", {"k": K}, None),
    ("BatchTopKTrainer", {"k": K}, 0.3),
    ("BatchTopKTrainer", {"k": K}, -1.0),  # the "not estimated yet" value before threshold_start_step
    ("JumpReluTrainer", {}, None),
])
def test_dictionary_learning(tmp_path, dictionary_learning_worker, trainer, dict_kwargs, threshold):
    dictionary_learning_worker.apply(_dictionary_learning_case, (str(tmp_path), trainer, dict_kwargs, threshold))


def test_dictionary_learning_unsupported_class_is_an_error(tmp_path, dictionary_learning_worker):
    message = dictionary_learning_worker.apply(_dictionary_learning_unsupported_case, (str(tmp_path),))
    assert "dict_class 'GatedAutoEncoder' is not supported" in message


def test_sparse_codes_of_a_loaded_sae_convert_to_torch_sparse(tmp_path):
    # The torch.sparse forms hold the same codes as the dense encode (here: a SAELens TopK and ReLU SAE).
    for architecture, cfg in (("topk", {"k": K}), ("standard", {})):
        sae = _saelens_sae(architecture, **cfg)
        sae.save_model(tmp_path / architecture)
        ours, x = SAE.load(tmp_path / architecture, output="sparse"), _inputs()
        codes = ours.encode(x)
        sparse = codes.to_sparse_coo() if isinstance(codes, repkern.SparseCodes) else codes.to_sparse_csr()
        with torch.no_grad():
            torch.testing.assert_close(sparse.to_dense(), sae.encode(x), **TOL)
