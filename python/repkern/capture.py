"""Activation capture: forward hooks on named modules, pooled per batch::

    with repkern.capture(model, ["encoder.layer.*"], pool="mean") as cap:
        for batch in loader:
            acts = cap.run(**batch)          # {layer name: (batch, d)} for "mean"/"last"
            ...                              # feed an accumulator; nothing is kept

Layers are given by exact name, by module object, or by a glob on
``model.named_modules()`` names: ``*`` and ``?`` stay within one dotted
component (``"encoder.layer.*"`` is the layers, not their submodules), ``**``
crosses dots. The order is the model's. A hooked module's output may be a tensor, a tuple/list (the hidden
state is its first element) or a ``ModelOutput``-like object (its
``last_hidden_state``, else its first element). Outputs of shape
``(batch, seq, d)`` are pooled with the attention mask (1 = token, 0 = padding)::

  "all"   every non-padding token -> (tokens, d) (batch-major order)
  "last"  the last non-padding token of each sequence (left or right padding) -> (batch, d)
  "mean"  the mean over non-padding tokens -> (batch, d)

Outputs of shape ``(batch, d)`` are returned as they are. Hooks are removed on
exit, also when the block raises.

``site="input"`` records a module's input instead (forward pre-hooks: its first positional tensor
argument, else its first tensor keyword argument), e.g. the residual stream entering a block, where
SAEs trained on ``resid_pre`` or MLP inputs read it. ``stop_early=True`` ends the forward pass of
:meth:`Capture.run` as soon as every hooked module has been recorded, so nothing after the last one
(later layers, the head) is computed; the model's own output is then never produced.
:func:`repkern.compare_models` and :func:`repkern.profile_sparsity` turn it on. A hooked module that
runs twice in one forward pass (a shared or reused module) raises a RuntimeError naming it: its two
activations cannot both be "the layer's" activation.

TransformerLens models work by name: their hook points (``blocks.0.hook_resid_post``,
``blocks.*.hook_resid_pre``, ``hook_embed``, ...) are identity ``HookPoint`` modules, so their output is
the activation TransformerLens caches under that name.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

POOLS = ("all", "last", "mean")
SITES = ("output", "input")
LayerSpec = Union[str, nn.Module]


def _glob_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wild = {"**": ".*", "*": "[^.]*", "?": "[^.]"}
    return re.compile("".join(wild.get(p, re.escape(p)) for p in parts) + r"\Z")


def resolve_layers(model: nn.Module, layers: Union[LayerSpec, Sequence[LayerSpec]]) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs for names, module objects and globs, in the model's order."""
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    named = [(name, module) for name, module in model.named_modules() if name]
    by_module = {id(module): name for name, module in named}
    wanted: set[str] = set()
    for spec in layers:
        if isinstance(spec, nn.Module):
            if id(spec) not in by_module:
                raise ValueError(f"layers: module {type(spec).__name__} is not a submodule of the model")
            wanted.add(by_module[id(spec)])
        elif isinstance(spec, str):
            regex = _glob_regex(spec)
            hits = [name for name, _ in named if regex.match(name)]
            if not hits:
                examples = ", ".join(name for name, _ in named[:8])
                raise ValueError(f"layers: {spec!r} matches no module name (names look like: {examples}, ...)")
            wanted.update(hits)
        else:
            raise TypeError(f"layers: expected module names, globs or modules, got {type(spec).__name__}")
    return [(name, module) for name, module in named if name in wanted]


def hidden_state(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output."""
    if isinstance(output, torch.Tensor):
        return output
    state = getattr(output, "last_hidden_state", None)
    if isinstance(state, torch.Tensor):
        return state
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "__getitem__"):
        try:
            first = output[0]
        except (KeyError, IndexError, TypeError):
            first = None
        if isinstance(first, torch.Tensor):
            return first
    raise TypeError(f"capture: cannot find a hidden-state tensor in a module output of type {type(output).__name__}")


def pool_tokens(hidden: torch.Tensor, mask: Optional[torch.Tensor], pool: str) -> torch.Tensor:
    """hidden (batch, seq, d) with mask (batch, seq) -> pooled activations (see module doc)."""
    if hidden.dim() == 2:
        return hidden
    if hidden.dim() != 3:
        raise ValueError(f"capture: expected a (batch, seq, d) or (batch, d) output, got shape {tuple(hidden.shape)}")
    batch, seq, _ = hidden.shape
    if mask is None:
        mask = torch.ones(batch, seq, dtype=torch.bool, device=hidden.device)
    else:
        if mask.shape != (batch, seq):
            raise ValueError(f"attention_mask: expected shape {(batch, seq)}, got {tuple(mask.shape)}")
        mask = mask.to(device=hidden.device, dtype=torch.bool)
    if pool == "all":
        return hidden[mask]
    if pool == "mean":
        weights = mask.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
    positions = torch.arange(seq, device=hidden.device).expand(batch, seq)
    last = torch.where(mask, positions, -1).amax(dim=1).clamp_min(0)  # all-padding rows: position 0
    return hidden[torch.arange(batch, device=hidden.device), last]


def first_tensor_input(name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The input a forward pre-hook records: the first positional tensor, else the first tensor keyword."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"capture: module {name!r} was called without a tensor argument (site='input')")


class _StopForward(Exception):
    """Raised by the hook that records the last missing activation (stop_early); caught in Capture.forward."""


class Capture:
    """Context manager returned by :func:`capture`."""

    def __init__(self, model: nn.Module, layers, pool: str, detach: bool, site: str, stop_early: bool):
        if pool not in POOLS:
            raise ValueError(f"pool: expected one of {POOLS}, got {pool!r}")
        if site not in SITES:
            raise ValueError(f"site: expected one of {SITES}, got {site!r}")
        if not isinstance(stop_early, bool):
            raise TypeError(f"stop_early: expected a bool, got {type(stop_early).__name__}")
        self.model = model
        self.pool = pool
        self.detach = detach
        self.site = site
        self.stop_early = stop_early
        self.layers = resolve_layers(model, layers)
        self.names = [name for name, _ in self.layers]
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._in_forward = False  # stop_early applies only to forward passes run by forward()/run()

    def __enter__(self) -> "Capture":
        for name, module in self.layers:
            if self.site == "output":
                handle = module.register_forward_hook(self._output_hook(name))
            else:
                handle = module.register_forward_pre_hook(self._input_hook(name), with_kwargs=True)
            self._handles.append(handle)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Removes the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def _record(self, name: str, state: torch.Tensor) -> None:
        if name in self._outputs:
            raise RuntimeError(f"capture: module {name!r} ran twice in one forward pass (a shared or reused module, "
                               "or a second forward pass without collect()); hook a module that runs once per pass")
        self._outputs[name] = state.detach() if self.detach else state
        if self.stop_early and self._in_forward and len(self._outputs) == len(self.names):
            raise _StopForward

    def _output_hook(self, name: str):
        def hook(_module, _inputs, output):
            self._record(name, hidden_state(output))

        return hook

    def _input_hook(self, name: str):
        def hook(_module, args, kwargs):
            self._record(name, first_tensor_input(name, args, kwargs))

        return hook

    def collect(self, attention_mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Pooled activations of the last forward pass, then forgets them."""
        missing = [name for name in self.names if name not in self._outputs]
        if missing:
            raise RuntimeError(f"capture: no output recorded for {missing}; run the model inside the block first")
        pooled = {name: pool_tokens(self._outputs[name], attention_mask, self.pool) for name in self.names}
        self._outputs.clear()
        return pooled

    def forward(self, *args, **kwargs) -> None:
        """One forward pass of the model with the hooks on (stopped early when asked); its output is not
        kept. The activations are then read with :meth:`collect`."""
        self._outputs.clear()  # what an interrupted earlier pass left
        self._in_forward = True
        try:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach):
                self.model(*args, **kwargs)
        except _StopForward:
            pass
        finally:
            self._in_forward = False

    def run(self, *args, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> dict[str, torch.Tensor]:
        """Runs the model (passing ``attention_mask`` on when given) and returns the
        pooled activations of this batch."""
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        self.forward(*args, **kwargs)
        return self.collect(attention_mask)


def capture(
    model: nn.Module,
    layers: Union[LayerSpec, Iterable[LayerSpec]],
    *,
    pool: str = "all",
    detach: bool = True,
    site: str = "output",
    stop_early: bool = False,
) -> Capture:
    """Hooks ``layers`` of ``model`` and returns a context manager whose
    ``run(*args, attention_mask=None, **kwargs)`` runs the model on one batch
    and returns ``{layer name: pooled activations}`` (see the module docstring).

    ``detach=False`` keeps the autograd graph (e.g. for a CKA loss in training). ``site="input"``
    records each module's input instead of its output. ``stop_early=True`` stops :meth:`Capture.run`'s
    forward pass once every hooked module is recorded (a forward pass you call yourself is never
    stopped); leave it off when you need the model's output or its side effects (caches, losses)."""
    return Capture(model, list(layers) if not isinstance(layers, (str, nn.Module)) else layers, pool, detach, site,
                   stop_early)
