"""``repkern.SAE``: a sparse autoencoder module on repkern's encode/decode, and loaders
for the checkpoint formats of SAELens, EleutherAI sparsify, Gemma Scope and
dictionary_learning.

Each loader maps a format onto one convention (docs/conventions.md: W_enc (d_in, d_sae),
W_dec (d_sae, d_in), optional pre-encoder bias b_dec) plus the format's activation:

===================  =========================================  ==========================================
format               files                                      encode
===================  =========================================  ==========================================
saelens              ``cfg.json``, ``sae_weights.safetensors``  (x − b_dec if apply_b_dec_to_input) W_enc + b_enc; standard (ReLU), topk (top-k then ReLU), jumprelu
sparsify             ``cfg.json``, ``sae.safetensors``          ReLU(encoder(x − b_dec)), then top-k (``relu_first``); encoder.weight is (d_sae, d_in)
gemmascope           ``params.npz``                             JumpReLU of x W_enc + b_enc (no b_dec subtraction)
dictionary_learning  ``ae.pt`` (+ ``config.json``)              AutoEncoder: ReLU(encoder(x − bias)); AutoEncoderTopK: ReLU then top-k; BatchTopKSAE: relu(h)·[h > threshold]
===================  =========================================  ==========================================
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import Tensor, nn

from repkern import _validation
from repkern.ops.sae import sae_decode, sae_encode

__all__ = ["SAE", "FORMATS", "NORMALIZATIONS"]

FORMATS = ("auto", "saelens", "sparsify", "gemmascope", "dictionary_learning")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")


class SAE(nn.Module):
    """Sparse autoencoder: codes = activation((x − b_dec) W_enc + b_enc), x̂ = codes W_dec + b_dec.

    Args:
        W_enc: ``(d_in, d_sae)``.
        b_enc: ``(d_sae,)``.
        W_dec: ``(d_sae, d_in)``.
        b_dec: ``(d_in,)``.
        activation, k, relu_first: as in :func:`repkern.sae_encode`.
        threshold: JumpReLU θ ``(d_sae,)`` or BatchTopK's inference scalar; kept in
            float32 and learnable (a parameter).
        apply_b_dec_to_input: subtract b_dec from x before encoding (SAELens' flag).
        normalize_activations: ``"none"``; ``"constant_norm_rescale"`` (x · √d_in/‖x‖ in,
            undone on the output of forward); ``"layer_norm"`` ((x − mean)/(std + 1e-5) in,
            undone on the output of forward) — SAELens' run-time normalizations.
        output: default output of :meth:`encode` (``"dense"`` or ``"sparse"``).
    """

    def __init__(self, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, *, activation: str = "relu",
                 k=None, threshold=None, relu_first: bool = False, apply_b_dec_to_input: bool = True,
                 normalize_activations: str = "none", output: str = "dense"):
        super().__init__()
        self.W_enc = nn.Parameter(W_enc.detach().clone())
        self.b_enc = nn.Parameter(b_enc.detach().clone())
        self.W_dec = nn.Parameter(W_dec.detach().clone())
        self.b_dec = nn.Parameter(b_dec.detach().clone())
        if threshold is not None:
            threshold = torch.as_tensor(threshold, dtype=torch.float32, device=W_enc.device)
            self.threshold = nn.Parameter(threshold.detach().clone())
        else:
            self.threshold = None
        self.activation, self.k, self.relu_first = activation, k, relu_first
        self.apply_b_dec_to_input = _validation.boolean("apply_b_dec_to_input", apply_b_dec_to_input)
        self.normalize_activations = _validation.choice("normalize_activations", normalize_activations, NORMALIZATIONS)
        self.output = _validation.choice("output", output, ("dense", "sparse"))
        if tuple(self.W_dec.shape) != tuple(self.W_enc.shape[::-1]):
            raise ValueError(f"W_dec: expected shape (d_sae, d_in) = {tuple(self.W_enc.shape[::-1])}, "
                             f"got {tuple(self.W_dec.shape)}")
        # Validates activation / k / threshold / shapes once, on an empty batch.
        self.encode(self.W_enc.new_empty((0, self.d_in)))

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def _normalize(self, x: Tensor):
        """x normalized as configured, and the function that undoes it on an output."""
        if self.normalize_activations == "constant_norm_rescale":
            coeff = self.d_in**0.5 / x.norm(dim=-1, keepdim=True)
            return x * coeff, lambda y: y / coeff
        if self.normalize_activations == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            std = (x - mu).std(dim=-1, keepdim=True)
            return (x - mu) / (std + 1e-5), lambda y: y * std + mu
        return x, lambda y: y

    def _encode_normalized(self, x: Tensor, output: Optional[str] = None):
        return sae_encode(x, self.W_enc, self.b_enc, b_dec=self.b_dec if self.apply_b_dec_to_input else None,
                          activation=self.activation, k=self.k, threshold=self.threshold, relu_first=self.relu_first,
                          output=output or self.output)

    def encode(self, x: Tensor, output: Optional[str] = None):
        """Codes of x ``(..., d_in)``: dense ``(..., d_sae)``, SparseCodes or CsrCodes."""
        return self._encode_normalized(self._normalize(x)[0], output)

    def decode(self, codes) -> Tensor:
        """x̂ = codes W_dec + b_dec ``(..., d_in)`` (in the normalized space, if any)."""
        return sae_decode(codes, self.W_dec, self.b_dec)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of x; sparse codes in between when ``output="sparse"``."""
        xn, undo = self._normalize(x)
        return undo(self.decode(self._encode_normalized(xn)))

    @classmethod
    def load(cls, path, format: str = "auto", *, device=None, dtype: Optional[torch.dtype] = None,
             output: str = "dense") -> "SAE":
        """Loads a checkpoint (directory or file) of one of :data:`FORMATS`.

        ``format="auto"`` recognizes the files each format writes. Unknown formats and
        missing keys raise ValueError listing what was found. ``dtype``/``device``
        convert the weights (the threshold stays float32)."""
        _validation.choice("format", format, FORMATS)
        path = os.fspath(path)
        if format == "auto":
            format = _detect_format(path)
        kwargs = _LOADERS[format](path)
        tensors = {n: kwargs[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        for name, t in tensors.items():
            kwargs[name] = t.to(device=device, dtype=dtype or t.dtype)
        if kwargs.get("threshold") is not None:
            kwargs["threshold"] = torch.as_tensor(kwargs["threshold"]).to(device=device, dtype=torch.float32)
        return cls(**kwargs, output=output)


# ---- loaders -----------------------------------------------------------------------------


def _files(path: str) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else [os.path.basename(path)]


def _find(path: str, name: str) -> Optional[str]:
    """`path` itself if it is the file `name`, or `name` inside the directory `path`."""
    if os.path.isdir(path):
        candidate = os.path.join(path, name)
        return candidate if os.path.isfile(candidate) else None
    return path if os.path.basename(path) == name and os.path.isfile(path) else None


def _detect_format(path: str) -> str:
    if not os.path.exists(path):
        raise ValueError(f"path: {path!r} does not exist")
    if _find(path, "cfg.json") and _find(path, "sae_weights.safetensors"):
        return "saelens"
    if _find(path, "cfg.json") and _find(path, "sae.safetensors"):
        return "sparsify"
    if _find(path, "params.npz"):
        return "gemmascope"
    if _find(path, "ae.pt"):
        return "dictionary_learning"
    raise ValueError(
        f"path: cannot tell the checkpoint format of {path!r}; found files {_files(path)}. Expected one of: "
        "cfg.json + sae_weights.safetensors (saelens), cfg.json + sae.safetensors (sparsify), params.npz "
        "(gemmascope), ae.pt (dictionary_learning)")


def _require(tensors: dict, names, what: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{what}: missing keys {missing}; found keys {sorted(tensors)}")


def _required_file(path: str, name: str, fmt: str) -> str:
    found = _find(path, name)
    if found is None:
        raise ValueError(f"path: {fmt} checkpoint needs {name}; found files {_files(path)}")
    return found


def _load_safetensors(file: str) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:  # pragma: no cover - the package is a dependency
        raise ImportError("loading safetensors checkpoints needs the `safetensors` package") from exc
    return load_file(file)


def _read_json(file: str) -> dict:
    with open(file) as f:
        return json.load(f)


def _load_saelens(path: str) -> dict:
    cfg = _read_json(_required_file(path, "cfg.json", "saelens"))
    tensors = _load_safetensors(_required_file(path, "sae_weights.safetensors", "saelens"))
    what = "saelens sae_weights.safetensors"
    _require(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), what)
    architecture = cfg.get("architecture")
    if architecture is None:  # older configs name the activation instead
        architecture = {"relu": "standard", "topk": "topk"}.get(cfg.get("activation_fn_str", cfg.get("activation_fn")),
                                                                "jumprelu" if "threshold" in tensors else "standard")
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    out = dict(W_enc=tensors["W_enc"], b_enc=tensors["b_enc"], W_dec=tensors["W_dec"], b_dec=tensors["b_dec"],
               apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
               normalize_activations=cfg.get("normalize_activations") or "none")
    if out["normalize_activations"] not in NORMALIZATIONS:
        raise ValueError(f"saelens cfg.json: normalize_activations={out['normalize_activations']!r} needs a "
                         f"dataset scaling factor that the checkpoint does not hold; supported: {NORMALIZATIONS}")
    if architecture == "standard":
        out["activation"] = "relu"
    elif architecture == "topk":
        if k is None:
            raise ValueError(f"saelens cfg.json: architecture 'topk' needs k; found keys {sorted(cfg)}")
        out.update(activation="topk", k=int(k))
    elif architecture == "jumprelu":
        _require(tensors, ("threshold",), what)
        out.update(activation="jumprelu", threshold=tensors["threshold"])
    elif architecture == "batchtopk":
        if "threshold" in tensors:
            out.update(activation="batchtopk", threshold=tensors["threshold"].reshape(-1)[0])
        else:
            out.update(activation="batchtopk", k=float(k))
    else:
        raise ValueError(f"saelens cfg.json: unsupported architecture {architecture!r} "
                         "(supported: standard, topk, jumprelu, batchtopk)")
    return out


def _load_sparsify(path: str) -> dict:
    cfg = _read_json(_required_file(path, "cfg.json", "sparsify"))
    tensors = _load_safetensors(_required_file(path, "sae.safetensors", "sparsify"))
    _require(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), "sparsify sae.safetensors")
    if "k" not in cfg:
        raise ValueError(f"sparsify cfg.json: missing key 'k'; found keys {sorted(cfg)}")
    if cfg.get("activation", "topk") != "topk" or cfg.get("transcode") or cfg.get("skip_connection"):
        raise ValueError("sparsify cfg.json: only top-k sparse autoencoders are supported (not groupmax "
                         "activations, transcoders or skip connections)")
    return dict(W_enc=tensors["encoder.weight"].mT.contiguous(), b_enc=tensors["encoder.bias"], W_dec=tensors["W_dec"],
                b_dec=tensors["b_dec"], activation="topk", k=int(cfg["k"]), relu_first=True)


def _load_gemmascope(path: str) -> dict:
    import numpy as np

    with np.load(_required_file(path, "params.npz", "gemmascope")) as params:
        tensors = {name: torch.from_numpy(params[name]) for name in params.files}
    _require(tensors, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), "gemmascope params.npz")
    return dict(W_enc=tensors["W_enc"], b_enc=tensors["b_enc"], W_dec=tensors["W_dec"], b_dec=tensors["b_dec"],
                activation="jumprelu", threshold=tensors["threshold"], apply_b_dec_to_input=False)


def _load_dictionary_learning(path: str) -> dict:
    state = torch.load(_required_file(path, "ae.pt", "dictionary_learning"), map_location="cpu", weights_only=True)
    config_file = _find(path, "config.json") if os.path.isdir(path) else None
    dict_class = (_read_json(config_file).get("trainer") or {}).get("dict_class") if config_file else None
    what = "dictionary_learning ae.pt"
    if "bias" in state:  # AutoEncoder: relu(encoder(x − bias)), decoder(f) + bias
        _require(state, ("encoder.weight", "encoder.bias", "decoder.weight"), what)
        return dict(W_enc=state["encoder.weight"].mT.contiguous(), b_enc=state["encoder.bias"],
                    W_dec=state["decoder.weight"].mT.contiguous(), b_dec=state["bias"], activation="relu")
    _require(state, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec"), what)
    common = dict(W_enc=state["encoder.weight"].mT.contiguous(), b_enc=state["encoder.bias"],
                  W_dec=state["decoder.weight"].mT.contiguous(), b_dec=state["b_dec"])
    if dict_class == "BatchTopKSAE":  # inference: relu(h)·[relu(h) > threshold]
        _require(state, ("threshold",), what)
        return dict(common, activation="batchtopk", threshold=state["threshold"].reshape(()))
    _require(state, ("k",), what)  # AutoEncoderTopK: relu, then top-k
    return dict(common, activation="topk", k=int(state["k"]), relu_first=True)


_LOADERS = {
    "saelens": _load_saelens,
    "sparsify": _load_sparsify,
    "gemmascope": _load_gemmascope,
    "dictionary_learning": _load_dictionary_learning,
}
