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
        for name, t, hint in (("W_enc", W_enc, "(d_in, d_sae)"), ("b_enc", b_enc, "(d_sae,)"),
                              ("W_dec", W_dec, "(d_sae, d_in)"), ("b_dec", b_dec, "(d_in,)")):
            _validation.floating_tensor(name, t, shape_hint=hint)  # a TypeError naming it, not a parameter error
        self.W_enc = nn.Parameter(W_enc.detach().clone())
        self.b_enc = nn.Parameter(b_enc.detach().clone())
        self.W_dec = nn.Parameter(W_dec.detach().clone())
        self.b_dec = nn.Parameter(b_dec.detach().clone())
        if threshold is not None:
            if not isinstance(threshold, (torch.Tensor, int, float)) or isinstance(threshold, bool):
                raise TypeError(f"threshold: expected a float or a tensor, got {type(threshold).__name__}")
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
        missing keys raise ValueError listing what was found; a folder holding the files of
        several formats raises ValueError naming them (pass ``format=``). Malformed configs
        (a TopK ``k`` that is not an integer, a BatchTopK cfg with neither ``k`` nor a
        one-value threshold, a ``cfg.json`` that is not an object), weights that are not
        floating tensors, and truncated or corrupted files raise ValueError / TypeError
        naming the file or field. ``dtype``/``device`` convert the weights (the threshold
        stays float32)."""
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


# The files that identify each format (format="auto").
_SIGNATURES = {
    "saelens": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "gemmascope": ("params.npz",),
    "dictionary_learning": ("ae.pt",),
}


def _detect_format(path: str) -> str:
    if not os.path.exists(path):
        raise ValueError(f"path: {path!r} does not exist")
    found = [fmt for fmt, names in _SIGNATURES.items() if all(_find(path, name) for name in names)]
    if len(found) > 1:
        raise ValueError(f"path: {path!r} holds checkpoints of several formats: "
                         + ", ".join(f"{fmt} ({' + '.join(_SIGNATURES[fmt])})" for fmt in found)
                         + "; name the one to load with format=")
    if found:
        return found[0]
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


def _unreadable(file: str, what: str, exc: Exception) -> ValueError:
    return ValueError(f"path: {file} is not a readable {what} ({type(exc).__name__}: {exc})")


def _load_safetensors(file: str) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:  # pragma: no cover - the package is a dependency
        raise ImportError("loading safetensors checkpoints needs the `safetensors` package") from exc
    try:
        return load_file(file)
    except OSError:
        raise
    except Exception as exc:  # a truncated or corrupted file: safetensors' own error types
        raise _unreadable(file, "safetensors file", exc) from exc


def _read_json(file: str, what: str) -> dict:
    """A JSON object (dict) from `file`; anything else is a ValueError naming `what`."""
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except ValueError as exc:  # invalid JSON or UTF-8
        raise _unreadable(file, "JSON file", exc) from exc
    if not isinstance(value, dict):
        raise ValueError(f"{what}: expected a JSON object, got a JSON {type(value).__name__}")
    return value


def _tensor(tensors: dict, name: str, what: str, dim: int) -> Tensor:
    """tensors[name], a tensor with `dim` dims (before any transpose the loader applies)."""
    value = tensors[name]
    if not isinstance(value, Tensor) or value.dim() != dim:
        got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{what}: {name} must be a {dim}-d tensor, got {got}")
    return value


def _integer_k(value, what: str) -> int:
    """TopK's k from a config or checkpoint: an integer (an int, an integral float such as 32.0, or a
    one-element integer tensor); bools, fractions and other types are errors, not silently truncated."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{what}: k must be one integer, got a {value.dtype} tensor of shape {tuple(value.shape)}")
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what}: k must be an integer, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{what}: k must be an integer, got {value!r}")
    return int(value)


def _scalar_threshold(value: Tensor, what: str) -> Tensor:
    """BatchTopK's inference threshold: a tensor holding exactly one value, as a 0-d tensor."""
    if value.numel() != 1:
        raise ValueError(f"{what}: the BatchTopK threshold must hold one value, got shape {tuple(value.shape)}")
    return value.reshape(())


def _load_saelens(path: str) -> dict:
    cfg = _read_json(_required_file(path, "cfg.json", "saelens"), "saelens cfg.json")
    tensors = _load_safetensors(_required_file(path, "sae_weights.safetensors", "saelens"))
    what = "saelens sae_weights.safetensors"
    _require(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), what)
    architecture = cfg.get("architecture")
    if architecture is None:  # older configs name the activation instead
        activation = cfg.get("activation_fn_str", cfg.get("activation_fn"))
        architecture = {"relu": "standard", "topk": "topk"}.get(activation if isinstance(activation, str) else None,
                                                                "jumprelu" if "threshold" in tensors else "standard")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"saelens cfg.json: activation_fn_kwargs must be an object, got {kwargs!r}")
    k = cfg.get("k", kwargs.get("k"))
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise ValueError(f"saelens cfg.json: apply_b_dec_to_input must be true or false, got {apply_b_dec!r}")
    out = dict(W_enc=tensors["W_enc"], b_enc=tensors["b_enc"], W_dec=tensors["W_dec"], b_dec=tensors["b_dec"],
               apply_b_dec_to_input=apply_b_dec, normalize_activations=cfg.get("normalize_activations") or "none")
    if not isinstance(out["normalize_activations"], str) or out["normalize_activations"] not in NORMALIZATIONS:
        raise ValueError(f"saelens cfg.json: normalize_activations={out['normalize_activations']!r} needs a "
                         f"dataset scaling factor that the checkpoint does not hold; supported: {NORMALIZATIONS}")
    if architecture == "standard":
        out["activation"] = "relu"
    elif architecture == "topk":
        if k is None:
            raise ValueError(f"saelens cfg.json: architecture 'topk' needs k; found keys {sorted(cfg)}")
        out.update(activation="topk", k=_integer_k(k, "saelens cfg.json"))
    elif architecture == "jumprelu":
        _require(tensors, ("threshold",), what)
        out.update(activation="jumprelu", threshold=tensors["threshold"])
    elif architecture == "batchtopk":  # inference with the stored threshold, else k (training rule)
        if "threshold" in tensors:
            out.update(activation="batchtopk", threshold=_scalar_threshold(tensors["threshold"], what))
        elif k is None:
            raise ValueError(f"saelens cfg.json: architecture 'batchtopk' needs a threshold tensor in "
                             f"sae_weights.safetensors or k in cfg.json; found keys {sorted(cfg)}")
        elif isinstance(k, bool) or not isinstance(k, (int, float)):
            raise TypeError(f"saelens cfg.json: k must be a number, got {type(k).__name__} {k!r}")
        else:
            out.update(activation="batchtopk", k=float(k))
    else:
        raise ValueError(f"saelens cfg.json: unsupported architecture {architecture!r} "
                         "(supported: standard, topk, jumprelu, batchtopk)")
    return out


def _load_sparsify(path: str) -> dict:
    cfg = _read_json(_required_file(path, "cfg.json", "sparsify"), "sparsify cfg.json")
    tensors = _load_safetensors(_required_file(path, "sae.safetensors", "sparsify"))
    _require(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), "sparsify sae.safetensors")
    _tensor(tensors, "encoder.weight", "sparsify sae.safetensors", 2)
    if "k" not in cfg:
        raise ValueError(f"sparsify cfg.json: missing key 'k'; found keys {sorted(cfg)}")
    if cfg.get("activation", "topk") != "topk" or cfg.get("transcode") or cfg.get("skip_connection"):
        raise ValueError("sparsify cfg.json: only top-k sparse autoencoders are supported (not groupmax "
                         "activations, transcoders or skip connections)")
    return dict(W_enc=tensors["encoder.weight"].mT.contiguous(), b_enc=tensors["encoder.bias"], W_dec=tensors["W_dec"],
                b_dec=tensors["b_dec"], activation="topk", k=_integer_k(cfg["k"], "sparsify cfg.json"), relu_first=True)


def _load_gemmascope(path: str) -> dict:
    import numpy as np

    file = _required_file(path, "params.npz", "gemmascope")
    try:
        with np.load(file) as params:
            if not hasattr(params, "files"):
                raise ValueError(f"path: {file} holds one array, not the named arrays of an .npz archive")
            arrays = {name: params[name] for name in params.files}
    except (OSError, ValueError):
        raise
    except Exception as exc:  # a truncated or corrupted archive: zipfile's and numpy's own error types
        raise _unreadable(file, ".npz archive", exc) from exc
    tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
    _require(tensors, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), "gemmascope params.npz")
    return dict(W_enc=tensors["W_enc"], b_enc=tensors["b_enc"], W_dec=tensors["W_dec"], b_dec=tensors["b_dec"],
                activation="jumprelu", threshold=tensors["threshold"], apply_b_dec_to_input=False)


def _load_dictionary_learning(path: str) -> dict:
    file = _required_file(path, "ae.pt", "dictionary_learning")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # truncated or corrupted: pickle's, zipfile's and torch's own error types
        raise _unreadable(file, "torch.save file", exc) from exc
    what = "dictionary_learning ae.pt"
    if not isinstance(state, dict):
        raise ValueError(f"{what}: expected a state dict, got {type(state).__name__}")
    config_file = _find(path, "config.json") if os.path.isdir(path) else None
    trainer = _read_json(config_file, "dictionary_learning config.json").get("trainer") if config_file else None
    dict_class = trainer.get("dict_class") if isinstance(trainer, dict) else None
    for name in ("encoder.weight", "decoder.weight"):
        if name in state:
            _tensor(state, name, what, 2)
    if "bias" in state:  # AutoEncoder: relu(encoder(x − bias)), decoder(f) + bias
        _require(state, ("encoder.weight", "encoder.bias", "decoder.weight"), what)
        return dict(W_enc=state["encoder.weight"].mT.contiguous(), b_enc=state["encoder.bias"],
                    W_dec=state["decoder.weight"].mT.contiguous(), b_dec=state["bias"], activation="relu")
    _require(state, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec"), what)
    common = dict(W_enc=state["encoder.weight"].mT.contiguous(), b_enc=state["encoder.bias"],
                  W_dec=state["decoder.weight"].mT.contiguous(), b_dec=state["b_dec"])
    if dict_class == "BatchTopKSAE":  # inference: relu(h)·[relu(h) > threshold]
        _require(state, ("threshold",), what)
        threshold = state["threshold"]
        if not isinstance(threshold, Tensor):
            threshold = torch.as_tensor(_number(threshold, "threshold", what))
        return dict(common, activation="batchtopk", threshold=_scalar_threshold(threshold, what))
    _require(state, ("k",), what)  # AutoEncoderTopK: relu, then top-k
    return dict(common, activation="topk", k=_integer_k(state["k"], what), relu_first=True)


def _number(value, name: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what}: {name} must be a number or a tensor, got {type(value).__name__}")
    return float(value)


_LOADERS = {
    "saelens": _load_saelens,
    "sparsify": _load_sparsify,
    "gemmascope": _load_gemmascope,
    "dictionary_learning": _load_dictionary_learning,
}
