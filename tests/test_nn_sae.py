"""repkern.SAE and its checkpoint loaders. Each test writes a small synthetic
checkpoint in a library's own format and checks repkern's encode/decode against that
library's formula, written out here independently (from its source, not repkern's)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import repkern
from repkern import SAE, CsrCodes, SparseCodes

D_IN, D_SAE = 12, 96


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(D_IN, D_SAE, generator=g) / math.sqrt(D_IN)
    W_dec = torch.randn(D_SAE, D_IN, generator=g) / math.sqrt(D_SAE)
    b_enc = 0.2 * torch.randn(D_SAE, generator=g)
    b_dec = 0.5 * torch.randn(D_IN, generator=g)
    threshold = 0.3 * torch.rand(D_SAE, generator=g)
    x = torch.randn(20, D_IN, generator=g) + b_dec
    return W_enc, W_dec, b_enc, b_dec, threshold, x


def _topk_dense(acts, k):
    top = acts.topk(k, dim=-1)
    return torch.zeros_like(acts).scatter(-1, top.indices, top.values)


def _check(sae, x, expected_codes, expected_recon):
    torch.testing.assert_close(sae.encode(x), expected_codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), expected_recon, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens(tmp_path, architecture, apply_b_dec):
    W_enc, W_dec, b_enc, b_dec, threshold, x = _weights()
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if architecture == "jumprelu":
        tensors["threshold"] = threshold
    save_file(tensors, tmp_path / "sae_weights.safetensors")
    cfg = {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": apply_b_dec,
           "normalize_activations": "none", "dtype": "float32"}
    if architecture == "topk":
        cfg["k"] = 7
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = SAE.load(tmp_path)
    # SAELens: sae_in = x − b_dec·apply_b_dec_to_input; hidden_pre = sae_in @ W_enc + b_enc
    hidden_pre = (x - b_dec * apply_b_dec) @ W_enc + b_enc
    if architecture == "standard":
        feats = torch.relu(hidden_pre)
    elif architecture == "topk":  # TopK: topk over hidden_pre, then ReLU on the values
        top = hidden_pre.topk(7, dim=-1)
        feats = torch.zeros_like(hidden_pre).scatter(-1, top.indices, torch.relu(top.values))
    else:
        feats = torch.relu(hidden_pre) * (hidden_pre > threshold)
    _check(sae, x, feats, feats @ W_dec + b_dec)


def test_saelens_old_config_and_constant_norm_rescale(tmp_path):
    W_enc, W_dec, b_enc, b_dec, _, x = _weights(1)
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, tmp_path / "sae_weights.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5},
                                                   "normalize_activations": "constant_norm_rescale"}))
    sae = SAE.load(tmp_path, format="saelens")
    coeff = D_IN**0.5 / x.norm(dim=-1, keepdim=True)
    hidden_pre = (x * coeff - b_dec) @ W_enc + b_enc
    top = hidden_pre.topk(5, dim=-1)
    feats = torch.zeros_like(hidden_pre).scatter(-1, top.indices, torch.relu(top.values))
    _check(sae, x, feats, (feats @ W_dec + b_dec) / coeff)


def test_sparsify(tmp_path):
    W_enc, W_dec, b_enc, b_dec, _, x = _weights(2)
    save_file({"encoder.weight": W_enc.mT.contiguous(), "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec},
              tmp_path / "sae.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({"expansion_factor": 8, "normalize_decoder": True,
                                                   "num_latents": D_SAE, "k": 6, "d_in": D_IN}))
    sae = SAE.load(tmp_path)
    # sparsify: pre_acts = relu(linear(x − b_dec, encoder.weight, encoder.bias)); topk(k); decode via W_dec
    pre_acts = torch.relu(torch.nn.functional.linear(x - b_dec, W_enc.mT, b_enc))
    top_acts, top_indices = pre_acts.topk(6, sorted=False)
    recon = torch.nn.functional.embedding_bag(top_indices, W_dec, per_sample_weights=top_acts, mode="sum") + b_dec
    _check(sae, x, torch.zeros_like(pre_acts).scatter(-1, top_indices, top_acts), recon)
    codes = sae.encode(x, output="sparse")
    assert isinstance(codes, SparseCodes)
    torch.testing.assert_close(codes.values, top_acts.sort(dim=-1, descending=True).values)


def test_gemmascope(tmp_path):
    W_enc, W_dec, b_enc, b_dec, threshold, x = _weights(3)
    np.savez(tmp_path / "params.npz", W_enc=W_enc.numpy(), W_dec=W_dec.numpy(), b_enc=b_enc.numpy(),
             b_dec=b_dec.numpy(), threshold=threshold.numpy())
    sae = SAE.load(tmp_path / "params.npz")
    # Gemma Scope: pre = x @ W_enc + b_enc (no b_dec subtraction); mask = pre > threshold; acts = mask * relu(pre)
    pre = x @ W_enc + b_enc
    acts = (pre > threshold) * torch.relu(pre)
    _check(sae, x, acts, acts @ W_dec + b_dec)
    assert sae.threshold.dtype == torch.float32 and sae.threshold.requires_grad


def test_dictionary_learning_autoencoder(tmp_path):
    W_enc, W_dec, b_enc, b_dec, _, x = _weights(4)
    torch.save({"bias": b_dec, "encoder.weight": W_enc.mT.contiguous(), "encoder.bias": b_enc,
                "decoder.weight": W_dec.mT.contiguous()}, tmp_path / "ae.pt")
    sae = SAE.load(tmp_path)
    enc = torch.nn.Linear(D_IN, D_SAE)
    dec = torch.nn.Linear(D_SAE, D_IN, bias=False)
    with torch.no_grad():
        enc.weight.copy_(W_enc.mT), enc.bias.copy_(b_enc), dec.weight.copy_(W_dec.mT)
        f = torch.relu(enc(x - b_dec))  # AutoEncoder.encode
        _check(sae, x, f, dec(f) + b_dec)


@pytest.mark.parametrize("dict_class", ["AutoEncoderTopK", "BatchTopKSAE"])
def test_dictionary_learning_topk(tmp_path, dict_class):
    W_enc, W_dec, b_enc, b_dec, _, x = _weights(5)
    torch.save({"encoder.weight": W_enc.mT.contiguous(), "encoder.bias": b_enc, "decoder.weight": W_dec.mT.contiguous(),
                "b_dec": b_dec, "k": torch.tensor(5, dtype=torch.int), "threshold": torch.tensor(0.25)},
               tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": dict_class, "k": 5}}))
    sae = SAE.load(tmp_path, format="dictionary_learning")
    post_relu = torch.relu((x - b_dec) @ W_enc + b_enc)
    if dict_class == "AutoEncoderTopK":  # relu, then top-k
        f = _topk_dense(post_relu, 5)
    else:  # BatchTopKSAE.encode(use_threshold=True)
        f = post_relu * (post_relu > 0.25)
    _check(sae, x, f, f @ W_dec + b_dec)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_saelens_rescale_acts_by_decoder_norm(tmp_path, architecture):
    W_enc, W_dec, b_enc, b_dec, _, x = _weights(7)
    W_dec = W_dec * torch.logspace(-1, 1, D_SAE)[:, None]  # unequal decoder norms, so the rescale matters
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, tmp_path / "sae_weights.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": architecture, "k": 5,
                                                   "rescale_acts_by_decoder_norm": True}))
    sae = SAE.load(tmp_path)
    # SAELens: hidden_pre = (sae_in @ W_enc + b_enc) * ‖W_dec rows‖; TopK (or BatchTopK: the 5·N largest
    # relu over the batch); decode: (acts / ‖W_dec rows‖) @ W_dec + b_dec
    norms = W_dec.norm(dim=-1)
    hidden_pre = ((x - b_dec) @ W_enc + b_enc) * norms
    if architecture == "topk":
        top = hidden_pre.topk(5, dim=-1)
        feats = torch.zeros_like(hidden_pre).scatter(-1, top.indices, torch.relu(top.values))
    else:
        flat = torch.relu(hidden_pre).flatten()
        top = flat.topk(5 * x.shape[0])
        feats = torch.zeros_like(flat).scatter(-1, top.indices, top.values).reshape(hidden_pre.shape)
    _check(sae, x, feats, (feats / norms) @ W_dec + b_dec)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))  # folded into the weights


@pytest.mark.parametrize("cfg, message", [
    ({"architecture": "standard", "normalize_activations": "expected_average_only_in"}, "expected_average_only_in"),
    ({"architecture": "standard", "normalize_activations": True}, "expected_average_only_in"),  # SAELens < 6
    ({"architecture": "standard", "normalize_activations": "covariance_whitening"}, "covariance_whitening"),
    ({"architecture": "standard", "finetuning_scaling_factor": True}, "finetuning_scaling_factor"),
    ({"architecture": "jumprelu", "rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm"),
    ({"architecture": "abstopk", "k": 4}, "unsupported architecture 'abstopk'"),
])
def test_saelens_flags_repkern_does_not_implement_are_errors(tmp_path, cfg, message):
    W_enc, W_dec, b_enc, b_dec, threshold, _ = _weights()
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold},
              tmp_path / "sae_weights.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        SAE.load(tmp_path)


def test_negative_thresholds_after_a_relu_load_as_zero(tmp_path):
    # relu(h)·[h > θ] with θ < 0 is relu(h): SAELens' JumpReLU and dictionary_learning's "unset" −1.
    W_enc, W_dec, b_enc, b_dec, threshold, x = _weights(8)
    threshold = threshold - 0.15
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold},
              tmp_path / "sae_weights.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "jumprelu"}))
    hidden_pre = (x - b_dec) @ W_enc + b_enc
    feats = torch.relu(hidden_pre) * (hidden_pre > threshold)
    _check(SAE.load(tmp_path), x, feats, feats @ W_dec + b_dec)
    torch.save({"encoder.weight": W_enc.mT.contiguous(), "encoder.bias": b_enc, "decoder.weight": W_dec.mT.contiguous(),
                "b_dec": b_dec, "k": torch.tensor(5, dtype=torch.int), "threshold": torch.tensor(-1.0)},
               tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE"}}))
    relu = torch.relu((x - b_dec) @ W_enc + b_enc)
    _check(SAE.load(tmp_path, format="dictionary_learning"), x, relu, relu @ W_dec + b_dec)


def test_sparsify_transcoder_and_unsupported_flags(tmp_path):
    W_enc, W_dec, b_enc, b_dec, _, x = _weights(9)
    save_file({"encoder.weight": W_enc.mT.contiguous(), "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec},
              tmp_path / "sae.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({"num_latents": D_SAE, "k": 6, "d_in": D_IN, "transcode": True}))
    sae = SAE.load(tmp_path)
    pre_acts = torch.relu(x @ W_enc + b_enc)  # a transcoder encodes x itself
    top = pre_acts.topk(6)
    feats = torch.zeros_like(pre_acts).scatter(-1, top.indices, top.values)
    _check(sae, x, feats, feats @ W_dec + b_dec)
    for cfg, flag in (({"skip_connection": True}, "skip_connection"), ({"activation": "groupmax"}, "groupmax")):
        (tmp_path / "cfg.json").write_text(json.dumps({"num_latents": D_SAE, "k": 6, "d_in": D_IN, **cfg}))
        with pytest.raises(ValueError, match=flag):
            SAE.load(tmp_path)


def test_dictionary_learning_jumprelu_and_unsupported_class(tmp_path):
    W_enc, W_dec, b_enc, b_dec, threshold, x = _weights(10)
    torch.save({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold},
               tmp_path / "ae.pt")
    pre_jump = x @ W_enc + b_enc  # JumpReluAutoEncoder: apply_b_dec_to_input is False
    feats = torch.relu(pre_jump * (pre_jump > threshold))
    _check(SAE.load(tmp_path), x, feats, feats @ W_dec + b_dec)
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "GatedAutoEncoder"}}))
    with pytest.raises(ValueError, match="dict_class 'GatedAutoEncoder' is not supported"):
        SAE.load(tmp_path)


def test_metadata_keeps_the_checkpoint_config(tmp_path):
    W_enc, W_dec, b_enc, b_dec, _, _ = _weights()
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, tmp_path / "sae_weights.safetensors")
    cfg = {"architecture": "standard", "metadata": {"hook_name": "blocks.2.hook_resid_pre", "model_name": "gpt2"}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert SAE.load(tmp_path).metadata == cfg
    assert SAE(W_enc, b_enc, W_dec, b_dec).metadata == {}
    with pytest.raises(TypeError, match="metadata: expected a dict"):
        SAE(W_enc, b_enc, W_dec, b_dec, metadata="gpt2")
    with pytest.raises(TypeError, match="expected a sae_lens SAE"):
        SAE.from_saelens(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expected a sparsify SparseCoder"):
        SAE.from_sparsify(object())


def test_from_pretrained_reads_a_hugging_face_cache_offline(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed (pip install 'repkern[sae]')")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: the cache built here must be enough
    W_enc, W_dec, b_enc, b_dec, _, x = _weights(12)
    # The cache layout huggingface_hub writes: refs/main names the snapshot folder of that commit.
    repo = tmp_path / "models--org--saes"
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = repo / "snapshots" / commit / "blocks.4.hook_resid_post"
    folder.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"architecture": "standard"}))
    sae = SAE.from_pretrained("org/saes", "blocks.4.hook_resid_post", cache_dir=tmp_path)
    feats = torch.relu((x - b_dec) @ W_enc + b_enc)
    _check(sae, x, feats, feats @ W_dec + b_dec)
    with pytest.raises(FileNotFoundError):  # huggingface_hub's LocalEntryNotFoundError: not in the cache
        SAE.from_pretrained("org/other", cache_dir=tmp_path)


def test_layer_norm_decode_alone_stays_in_the_normalized_space():
    W_enc, W_dec, b_enc, b_dec, _, x = _weights(11)
    sae = SAE(W_enc, b_enc, W_dec, b_dec, normalize_activations="layer_norm")
    mu, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
    feats = torch.relu(((x - mu) / (std + 1e-5) - b_dec) @ W_enc + b_enc)
    torch.testing.assert_close(sae.decode(sae.encode(x)), feats @ W_dec + b_dec, rtol=1e-5, atol=1e-5)
    _check(sae, x, feats, (feats @ W_dec + b_dec) * std + mu)


def test_unknown_format_lists_the_files(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot tell the checkpoint format.*found files \['weights.bin'\]"):
        SAE.load(tmp_path)
    with pytest.raises(ValueError, match="format: expected one of"):
        SAE.load(tmp_path, format="openai")
    with pytest.raises(ValueError, match=r"sparsify checkpoint needs cfg.json; found files \['weights.bin'\]"):
        SAE.load(tmp_path, format="sparsify")


def test_missing_keys_list_what_was_found(tmp_path):
    W_enc, W_dec, b_enc, b_dec, _, _ = _weights()
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec}, tmp_path / "sae_weights.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "standard"}))
    with pytest.raises(ValueError, match=r"missing keys \['b_dec'\]; found keys \['W_dec', 'W_enc', 'b_enc'\]"):
        SAE.load(tmp_path)
    np.savez(tmp_path / "params.npz", W_enc=W_enc.numpy())
    with pytest.raises(ValueError, match=r"gemmascope params.npz: missing keys \['b_enc', 'W_dec'"):
        SAE.load(tmp_path, format="gemmascope")
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "gated"}))
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="unsupported architecture 'gated'"):
        SAE.load(tmp_path, format="saelens")


def test_module_trains(backend):
    """forward/backward through sparse codes reaches every parameter, JumpReLU θ included."""
    W_enc, W_dec, b_enc, b_dec, threshold, x = _weights(6)
    for kw in (dict(activation="topk", k=6, output="sparse"), dict(activation="jumprelu", threshold=threshold)):
        sae = SAE(W_enc, b_enc, W_dec, b_dec, **kw).to(backend.device)
        xd = x.to(backend.device)
        loss = (sae(xd) - xd).square().mean() + 0.1 * sae.encode(xd, output="dense").sum(-1).mean()
        loss.backward()
        for name, p in sae.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        codes = sae.encode(xd, output="sparse")
        assert isinstance(codes, SparseCodes if kw["activation"] == "topk" else CsrCodes)


def test_module_rejects_bad_configuration():
    W_enc, W_dec, b_enc, b_dec, _, _ = _weights()
    with pytest.raises(ValueError, match="k: must be in"):
        SAE(W_enc, b_enc, W_dec, b_dec, activation="topk", k=D_SAE + 1)
    with pytest.raises(ValueError, match=r"W_dec: expected shape \(d_sae, d_in\)"):
        SAE(W_enc, b_enc, W_dec.mT, b_dec)
    with pytest.raises(ValueError, match="normalize_activations: expected one of"):
        SAE(W_enc, b_enc, W_dec, b_dec, normalize_activations="expected_average_only_in")
    assert repkern.SAE is SAE
