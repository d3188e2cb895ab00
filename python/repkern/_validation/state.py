"""Checkpoints of the accumulators (:class:`repkern.StreamingCKA`, :class:`repkern.MinibatchCKA`,
:class:`repkern.SparsityAccumulator`): the format version their ``state_dict`` carries and the checks
``load_state_dict`` runs on every entry before it changes anything (a rejected load leaves the
accumulator as it was)."""

from __future__ import annotations

from typing import Optional

import torch

# Version of the accumulators' state_dict layout. State dicts written before it was recorded have no
# "format_version" key and the same layout: they read as version 1.
STATE_FORMAT_VERSION = 1


def check_state_dict(state_dict, owner: str, keys) -> None:
    """`state_dict` is a dict from `owner`.state_dict() of a known format version holding `keys`."""
    if not isinstance(state_dict, dict) or "config" not in state_dict:
        raise TypeError(f"state_dict: expected a dict from {owner}.state_dict(), got "
                        f"{type(state_dict).__name__ if not isinstance(state_dict, dict) else 'a dict without config'}")
    version = state_dict.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version != STATE_FORMAT_VERSION:
        raise ValueError(f"state_dict: format_version {version!r} is not supported; this repkern reads "
                         f"{owner} state dicts of format version {STATE_FORMAT_VERSION}")
    if not isinstance(state_dict["config"], dict):
        raise TypeError(f"state_dict: config must be a dict, got {type(state_dict['config']).__name__}")
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict: missing key(s) {missing} (keys found: {sorted(map(str, state_dict))})")


def same_setting(got, want) -> bool:
    """A setting from a state dict (or another accumulator) equals ours: plain values compared with ==,
    anything whose comparison is not a plain bool (a tensor, an array) is a mismatch, not an exception."""
    try:
        equal = got == want
    except Exception:  # noqa: BLE001 - an object whose == raises is not our setting
        return False
    return equal if isinstance(equal, bool) else False


def state_count(state_dict: dict, key: str) -> int:
    """A non-negative int entry (a count)."""
    value = state_dict[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"state_dict: {key} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"state_dict: {key} must be >= 0, got {value}")
    return value


def state_bool(state_dict: dict, key: str) -> bool:
    value = state_dict[key]
    if not isinstance(value, bool):
        raise TypeError(f"state_dict: {key} must be a bool, got {type(value).__name__}")
    return value


def state_widths(value, key: str, *, allow_none: bool) -> Optional[tuple]:
    """A list of layer widths (ints >= 1), at least one, or None where allowed."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"state_dict: {key} must be a non-empty list of layer widths, got {value!r}")
    for w in value:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"state_dict: {key} must hold ints >= 1, got {value!r}")
    return tuple(value)


def state_tensor(value, key: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape) or value.dtype != dtype:
        got = (f"{value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
               else type(value).__name__)
        raise ValueError(f"state_dict: {key} must be a tensor of dtype {str(dtype).replace('torch.', '')} and shape "
                         f"{tuple(shape)}, got {got}")
    return value
