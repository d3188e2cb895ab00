"""Argument checks shared by every public function and by :mod:`repkern.reference`: bad input gets a
ValueError/TypeError naming the argument, whichever backend runs. One module per op family; this one holds
the checks of single values that every family uses."""

from __future__ import annotations

import math
import numbers
import os
from typing import Iterable, Optional

import torch


FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def floating_tensor(name: str, t, *, min_dim: int = 1, shape_hint: str = "") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, float64, float16 or bfloat16, got {t.dtype}")
    if t.dim() < min_dim:
        hint = f" {shape_hint}" if shape_hint else ""
        raise ValueError(f"{name}: expected at least {min_dim} dimensions{hint}, got shape {tuple(t.shape)}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: repkern supports CPU and CUDA tensors, got device {t.device}")
    return t


def is_finite(value) -> bool:
    """math.isfinite for a Python number, also under torch.compile(dynamic=True), where a float argument
    is a symbolic float that math.isfinite cannot take (comparisons work: NaN fails both)."""
    return -math.inf < value < math.inf


def choice(name: str, value, options: Iterable[str]) -> str:
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")
    return value


def positive_number(name: str, value, *, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not is_finite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    return value


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def integer(name: str, value, minimum: int) -> int:
    """value as an int >= minimum (bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value}")
    return value


def generator_seed(value) -> int:
    """A torch.Generator seed: an int in [0, 2**64 - 1]."""
    integer("seed", value, 0)
    if value >= 2**64:
        raise ValueError(f"seed: expected an int in [0, 2**64 - 1] (a torch.Generator seed), got {value}")
    return value


def same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where x is), got {t.device}")


def byte_budget(name: str, value, *, env: Optional[str] = None, default: Optional[int] = None) -> int:
    """A memory budget in bytes: `value` (a positive int) or, when it is None, the environment variable
    `env` (a positive integer) or `default`."""
    if value is None and env is not None:
        text = os.environ.get(env)
        if not text:
            return default
        try:
            number = int(text)
        except ValueError:
            number = 0
        if number <= 0:
            raise ValueError(f"{env} must be a positive integer (bytes), got {text!r}")
        return number
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int (bytes), got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive number of bytes, got {value}")
    return value
