"""``repkern.SAE``: a sparse autoencoder module on repkern's encode/decode, and loaders
for the checkpoint formats of SAELens, EleutherAI sparsify, Gemma Scope and
dictionary_learning.

Each loader maps a format onto one convention (docs/conventions.md: W_enc (d_in, d_sae),
W_dec (d_sae, d_in), optional pre-encoder bias b_dec) plus the format's activation:

===================  =========================================  ==========================================
format               files                                      encode
===================  =========================================  ==========================================
saelens              ``cfg.json``, ``sae_weights.safetensors``  (x − b_dec if apply_b_dec_to_input) W_enc + b_enc; standard (ReLU), topk (top-k then ReLU), jumprelu
sparsify             ``cfg.json``, ``sae.safetensors``          ReLU(encoder(x − b_dec)), then top-k (``relu_first``); encoder.weight is (d_sae, d_in); transcoders: no − b_dec
gemmascope           ``params.npz``                             JumpReLU of x W_enc + b_enc (no b_dec subtraction)
dictionary_learning  ``ae.pt`` (+ ``config.json``)              AutoEncoder: ReLU(encoder(x − bias)); AutoEncoderTopK: ReLU then top-k; BatchTopKSAE: relu(h)·[h > threshold]; JumpReluAutoEncoder
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
        metadata: the checkpoint's configuration (:meth:`load`, :meth:`from_saelens`,
            :meth:`from_sparsify` fill it: e.g. ``metadata["metadata"]["hook_name"]`` for
            SAELens); kept as :attr:`metadata`, a dict, and not used in the math.

    ``normalize_activations="layer_norm"``: :meth:`forward` normalizes x, encodes, decodes
    and undoes the normalization with x's own mean and std, as SAELens' forward does.
    :meth:`decode` alone returns x̂ in the normalized space: it cannot know the mean and
    std of the x the codes came from (SAELens' ``decode`` reuses those of its last
    ``encode`` call, a hidden state repkern does not keep). Same for
    ``"constant_norm_rescale"``.
    """

    def __init__(self, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, *, activation: str = "relu",
                 k=None, threshold=None, relu_first: bool = False, apply_b_dec_to_input: bool = True,
                 normalize_activations: str = "none", output: str = "dense", metadata: Optional[dict] = None):
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
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError(f"metadata: expected a dict, got {type(metadata).__name__}")
        self.metadata = dict(metadata or {})
        if tuple(self.W_dec.shape) != tuple(self.W_enc.shape[::-1]):
            raise ValueError(f"W_dec: expected shape (d_sae, d_in) = {tuple(self.W_enc.shape[::-1])}, "
                             f"got {tuple(self.W_dec.shape)}")
        # Validates activation / k / threshold / shapes once, on an empty batch (not normalized: its std warns).
        self._encode_normalized(self.W_enc.new_empty((0, self.d_in)))

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
        stays float32). :attr:`metadata` holds the checkpoint's config (SAELens' and
        sparsify's ``cfg.json``, dictionary_learning's ``config.json``; empty for Gemma Scope).

        What each format's flags become (tested against the packages themselves,
        tests/test_sae_parity.py):

        - SAELens: ``apply_b_dec_to_input``; ``normalize_activations`` ``"none"``,
          ``"constant_norm_rescale"``, ``"layer_norm"`` (see the class docstring for
          :meth:`decode` alone); ``rescale_acts_by_decoder_norm`` (TopK/BatchTopK) is folded
          into the weights — the codes and reconstructions are SAELens', W_dec's rows come
          out unit-norm; a JumpReLU threshold below 0 loads as 0 (the same codes).
          ``reshape_activations="hook_z"`` SAEs take x flattened to ``(..., n_heads·d_head)``.
          ValueError for what repkern does not implement: the architectures gated, abstopk,
          transcoders, matching pursuit, temporal; ``normalize_activations``
          ``"expected_average_only_in"`` / ``"covariance_whitening"`` (statistics not in the
          file: fold them first); ``finetuning_scaling_factor``.
        - sparsify: TopK ``SparseCoder``; a transcoder (``transcode``) encodes x without
          subtracting b_dec. ValueError: ``activation="groupmax"``, ``skip_connection``.
        - dictionary_learning: ``AutoEncoder``, ``AutoEncoderTopK``, ``BatchTopKSAE``
          (inference threshold), ``JumpReluAutoEncoder``; other ``dict_class`` values are a
          ValueError. These are the codes of the saved module; the package's own
          ``AutoEncoder.from_pretrained`` normalizes the decoder by default, which rescales
          the codes (not the reconstruction)."""
        _validation.choice("format", format, FORMATS)
        path = os.fspath(path)
        if format == "auto":
            format = _detect_format(path)
        return cls._build(_LOADERS[format](path), device, dtype, output)

    @classmethod
    def from_pretrained(cls, repo_id: str, subfolder: Optional[str] = None, *, format: str = "auto",
                        revision: Optional[str] = None, cache_dir=None, local_files_only: bool = False, device=None,
                        dtype: Optional[torch.dtype] = None, output: str = "dense") -> "SAE":
        """Loads the checkpoint in ``subfolder`` of the Hugging Face repository ``repo_id``
        (SAELens and sparsify repositories hold one folder per hook, Gemma Scope one per
        layer/width/L0) with :meth:`load`. The files come from ``huggingface_hub``'s
        ``snapshot_download``: only that folder is fetched, into ``cache_dir`` (default: the
        Hugging Face cache); ``local_files_only=True`` (or ``HF_HUB_OFFLINE=1``) reads the
        cache without the network. Needs the ``huggingface_hub`` package (the ``sae`` extra)."""
        try:
            from huggingface_hub import snapshot_download
        except ImportError as exc:
            raise ImportError("SAE.from_pretrained needs the `huggingface_hub` package "
                              "(pip install 'repkern[sae]')") from exc
        root = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                 allow_patterns=f"{subfolder.strip('/')}/*" if subfolder else None)
        path = os.path.join(root, subfolder) if subfolder else root
        return cls.load(path, format, device=device, dtype=dtype, output=output)

    @classmethod
    def from_saelens(cls, sae, *, device=None, dtype: Optional[torch.dtype] = None, output: str = "dense") -> "SAE":
        """Converts a live SAELens ``sae_lens.SAE`` (or a training SAE) with the rules of
        :meth:`load` (``format="saelens"``): its ``cfg.to_dict()`` and ``state_dict()``. The
        weights are copied; :attr:`metadata` is the config dict."""
        cfg, state = _live(sae, "sae_lens SAE")
        return cls._build(_saelens_kwargs(cfg.to_dict(), state, "sae_lens SAE"), device, dtype, output)

    @classmethod
    def from_sparsify(cls, coder, *, device=None, dtype: Optional[torch.dtype] = None,
                      output: str = "dense") -> "SAE":
        """Converts a live sparsify ``SparseCoder`` with the rules of :meth:`load`
        (``format="sparsify"``): its ``cfg.to_dict()`` plus ``d_in`` (what
        ``save_to_disk`` writes) and ``state_dict()``. The weights are copied."""
        cfg, state = _live(coder, "sparsify SparseCoder")
        return cls._build(_sparsify_kwargs({**cfg.to_dict(), "d_in": coder.d_in}, state, "sparsify SparseCoder"),
                          device, dtype, output)

    @classmethod
    def _build(cls, kwargs: dict, device, dtype, output: str) -> "SAE":
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            kwargs[name] = kwargs[name].to(device=device, dtype=dtype or kwargs[name].dtype)
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


def _live(obj, what: str):
    """(obj.cfg, detached state dict) of a live package object, or a TypeError naming `what`."""
    cfg = getattr(obj, "cfg", None)
    if not isinstance(obj, nn.Module) or not hasattr(cfg, "to_dict"):
        raise TypeError(f"expected a {what} (an nn.Module with a .cfg), got {type(obj).__name__}")
    return cfg, {name: t.detach().clone() for name, t in obj.state_dict().items()}


def _nonnegative(threshold: Tensor) -> Tensor:
    """A threshold θ applied after a ReLU: relu(h)·[h > θ] = relu(h)·[h > max(θ, 0)] exactly, so a
    negative θ (a SAELens JumpReLU file may hold one; dictionary_learning's −1 means "not set yet") loads as 0."""
    return threshold.clamp(min=0) if threshold.is_floating_point() else threshold  # else: the constructor's error


def _fold_decoder_norms(out: dict) -> None:
    """SAELens' rescale_acts_by_decoder_norm: h·‖W_dec[i]‖ before the top-k, codes/‖W_dec[i]‖ before the
    decoder. Folding the norms into the weights (W_enc[:, i] and b_enc[i] times the norm, W_dec[i] divided
    by it) gives the same codes and reconstructions, as SAELens' own fold_W_dec_norm does; computed in
    float64. A zero decoder row stays zero, and its code is then 0 (SAELens: 0·(1/0) = NaN)."""
    W_dec = out["W_dec"].double()
    norms = W_dec.norm(dim=-1)
    out["W_enc"] = (out["W_enc"].double() * norms).to(out["W_enc"].dtype)
    out["b_enc"] = (out["b_enc"].double() * norms).to(out["b_enc"].dtype)
    out["W_dec"] = (W_dec / norms.clamp(min=torch.finfo(torch.float64).tiny)[:, None]).to(out["W_dec"].dtype)


# SAELens' normalize_activations that need dataset statistics its SAE file does not hold (its trainer
# folds them into the weights and saves "none"; SAELens' own encode skips them when they were not folded).
_UNFOLDED_NORMALIZATIONS = ("expected_average_only_in", "covariance_whitening")


def _load_saelens(path: str) -> dict:
    cfg = _read_json(_required_file(path, "cfg.json", "saelens"), "saelens cfg.json")
    tensors = _load_safetensors(_required_file(path, "sae_weights.safetensors", "saelens"))
    return _saelens_kwargs(cfg, tensors, "saelens sae_weights.safetensors", "saelens cfg.json")


def _saelens_kwargs(cfg: dict, tensors: dict, what: str, cfg_what: Optional[str] = None) -> dict:
    cfg_what = cfg_what or what
    architecture = cfg.get("architecture")
    if architecture is None:  # older configs name the activation instead
        activation = cfg.get("activation_fn_str", cfg.get("activation_fn"))
        architecture = {"relu": "standard", "topk": "topk"}.get(activation if isinstance(activation, str) else None,
                                                                "jumprelu" if "threshold" in tensors else "standard")
    if architecture not in ("standard", "topk", "jumprelu", "batchtopk"):
        raise ValueError(f"{cfg_what}: unsupported architecture {architecture!r} "
                         "(supported: standard, topk, jumprelu, batchtopk)")
    _require(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), what)
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{cfg_what}: activation_fn_kwargs must be an object, got {kwargs!r}")
    k = cfg.get("k", kwargs.get("k"))
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise ValueError(f"{cfg_what}: apply_b_dec_to_input must be true or false, got {apply_b_dec!r}")
    normalize = cfg.get("normalize_activations") or "none"
    if normalize is True:  # SAELens < 6 wrote a bool for its dataset-wide scaling
        normalize = "expected_average_only_in"
    if normalize in _UNFOLDED_NORMALIZATIONS:
        raise ValueError(f"{cfg_what}: normalize_activations={normalize!r} is not supported: it needs dataset "
                         "statistics that the checkpoint does not hold. Fold them into the weights first (SAELens: "
                         "sae.fold_activation_norm_scaling_factor(factor) / sae.fold_activation_whitening(...), "
                         "which set it to 'none')")
    if not isinstance(normalize, str) or normalize not in NORMALIZATIONS:
        raise ValueError(f"{cfg_what}: unsupported normalize_activations={normalize!r}; supported: {NORMALIZATIONS}")
    if cfg.get("finetuning_scaling_factor") or (
            "scaling_factor" in tensors and not bool((tensors["scaling_factor"] == 1).all())):
        raise ValueError(f"{cfg_what}: finetuning_scaling_factor (a per-feature scale of the codes) is not supported")
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    if not isinstance(rescale, bool):
        raise ValueError(f"{cfg_what}: rescale_acts_by_decoder_norm must be true or false, got {rescale!r}")
    out = dict(W_enc=tensors["W_enc"], b_enc=tensors["b_enc"], W_dec=tensors["W_dec"], b_dec=tensors["b_dec"],
               apply_b_dec_to_input=apply_b_dec, normalize_activations=normalize, metadata=cfg)
    if rescale and architecture not in ("topk", "batchtopk"):
        raise ValueError(f"{cfg_what}: rescale_acts_by_decoder_norm is only defined for topk and batchtopk, "
                         f"not {architecture!r}")
    if architecture == "standard":
        out["activation"] = "relu"
    elif architecture == "topk":
        if k is None:
            raise ValueError(f"{cfg_what}: architecture 'topk' needs k; found keys {sorted(cfg)}")
        out.update(activation="topk", k=_integer_k(k, cfg_what))
    elif architecture == "jumprelu":
        _require(tensors, ("threshold",), what)
        threshold = tensors["threshold"]
        if "jumprelu_bandwidth" in cfg and threshold.is_floating_point() and bool((threshold < 0).any()):
            # SAELens' training JumpReLU is h·[h > θ] without a ReLU (it clamps θ >= 0 at every step)
            raise ValueError(f"{cfg_what}: a training JumpReLU SAE with a threshold below 0 keeps negative codes, "
                             "which repkern's relu(h)·[h > θ] does not; save it with save_inference_model")
        out.update(activation="jumprelu", threshold=_nonnegative(threshold))
    else:  # batchtopk: inference with the stored threshold, else k (training rule)
        if "threshold" in tensors:
            out.update(activation="batchtopk", threshold=_nonnegative(_scalar_threshold(tensors["threshold"], what)))
        elif k is None:
            raise ValueError(f"{cfg_what}: architecture 'batchtopk' needs a threshold tensor in the weights or "
                             f"k in the config; found keys {sorted(cfg)}")
        elif isinstance(k, bool) or not isinstance(k, (int, float)):
            raise TypeError(f"{cfg_what}: k must be a number, got {type(k).__name__} {k!r}")
        else:
            out.update(activation="batchtopk", k=float(k))
    # Non-floating weights are left to the constructor's TypeError.
    if rescale and all(out[n].is_floating_point() for n in ("W_enc", "b_enc", "W_dec")):
        _fold_decoder_norms(out)
    return out


def _load_sparsify(path: str) -> dict:
    cfg = _read_json(_required_file(path, "cfg.json", "sparsify"), "sparsify cfg.json")
    tensors = _load_safetensors(_required_file(path, "sae.safetensors", "sparsify"))
    return _sparsify_kwargs(cfg, tensors, "sparsify sae.safetensors", "sparsify cfg.json")


def _sparsify_kwargs(cfg: dict, tensors: dict, what: str, cfg_what: Optional[str] = None) -> dict:
    """sparsify: ReLU(encoder(x − b_dec)), top-k, W_dec codes + b_dec. A transcoder (``transcode``) encodes x
    itself (no b_dec subtraction) and its decode predicts the module's output instead of x."""
    cfg_what = cfg_what or what
    _require(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), what)
    _tensor(tensors, "encoder.weight", what, 2)
    if "k" not in cfg:
        raise ValueError(f"{cfg_what}: missing key 'k'; found keys {sorted(cfg)}")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{cfg_what}: activation={cfg['activation']!r} is not supported (only 'topk')")
    if cfg.get("skip_connection") or "W_skip" in tensors:
        raise ValueError(f"{cfg_what}: skip_connection (x W_skip added to the output) is not supported")
    transcode = cfg.get("transcode", False)
    if not isinstance(transcode, bool):
        raise ValueError(f"{cfg_what}: transcode must be true or false, got {transcode!r}")
    return dict(W_enc=tensors["encoder.weight"].mT.contiguous(), b_enc=tensors["encoder.bias"], W_dec=tensors["W_dec"],
                b_dec=tensors["b_dec"], activation="topk", k=_integer_k(cfg["k"], cfg_what), relu_first=True,
                apply_b_dec_to_input=not transcode, metadata=cfg)


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
                activation="jumprelu", threshold=tensors["threshold"], apply_b_dec_to_input=False, metadata={})


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
    config = _read_json(config_file, "dictionary_learning config.json") if config_file else {}
    trainer = config.get("trainer")
    dict_class = trainer.get("dict_class") if isinstance(trainer, dict) else None
    if dict_class is not None and dict_class not in _DICTIONARY_LEARNING_CLASSES:
        raise ValueError(f"dictionary_learning config.json: dict_class {dict_class!r} is not supported "
                         f"(supported: {', '.join(_DICTIONARY_LEARNING_CLASSES)})")
    for name in ("encoder.weight", "decoder.weight"):
        if name in state:
            _tensor(state, name, what, 2)
    if "W_enc" in state and "threshold" in state:  # JumpReluAutoEncoder: relu(h·[h > θ]), no b_dec subtraction
        _require(state, ("W_enc", "b_enc", "W_dec", "b_dec"), what)
        return dict(W_enc=state["W_enc"], b_enc=state["b_enc"], W_dec=state["W_dec"], b_dec=state["b_dec"],
                    activation="jumprelu", threshold=_nonnegative(state["threshold"]), apply_b_dec_to_input=False,
                    metadata=config)
    if "bias" in state:  # AutoEncoder: relu(encoder(x − bias)), decoder(f) + bias
        _require(state, ("encoder.weight", "encoder.bias", "decoder.weight"), what)
        return dict(W_enc=state["encoder.weight"].mT.contiguous(), b_enc=state["encoder.bias"],
                    W_dec=state["decoder.weight"].mT.contiguous(), b_dec=state["bias"], activation="relu",
                    metadata=config)
    _require(state, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec"), what)
    common = dict(W_enc=state["encoder.weight"].mT.contiguous(), b_enc=state["encoder.bias"],
                  W_dec=state["decoder.weight"].mT.contiguous(), b_dec=state["b_dec"], metadata=config)
    if dict_class == "BatchTopKSAE":  # inference: relu(h)·[relu(h) > threshold]
        _require(state, ("threshold",), what)
        threshold = state["threshold"]
        if not isinstance(threshold, Tensor):
            threshold = torch.as_tensor(_number(threshold, "threshold", what))
        return dict(common, activation="batchtopk", threshold=_nonnegative(_scalar_threshold(threshold, what)))
    _require(state, ("k",), what)  # AutoEncoderTopK: relu, then top-k
    return dict(common, activation="topk", k=_integer_k(state["k"], what), relu_first=True)


# dictionary_learning's dictionary classes whose ae.pt repkern reads (GatedAutoEncoder, Matryoshka... are not).
_DICTIONARY_LEARNING_CLASSES = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder")


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
