"""Reliability: each test pins one defect of the reliability issue (all-or-nothing checkpoint loads and
their format version, torch.compile with dynamic shapes, accumulators under inference_mode, edge values of
the arguments, clear exceptions, atomic saves and confined loads) and the crash-isolation helper."""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import repkern
from repkern import _validation, reference
from repkern.ops import cka as cka_ops
from repkern.results import CkaResult, load_result
from tests.isolation import WorkerCrash, note_case, run_isolated


def _data(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _layers(seed=0, n=40):
    base = _data(n, 4, seed=seed)
    return [base @ _data(4, 5, seed=seed + 1) + _data(n, 5, seed=seed + 2)], [base[:, :3] + _data(n, 3, seed=seed + 3)]


def _equal_states(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            if not _equal_states(x, y):
                return False
        elif isinstance(x, list) and x and isinstance(x[0], dict):
            if len(x) != len(y) or not all(_equal_states(p, q) for p, q in zip(x, y)):
                return False
        elif isinstance(x, torch.Tensor):
            same = (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape
                    and bool(((x == y) | (x.isnan() & y.isnan()) if x.is_floating_point() else (x == y)).all()))
            if not same:
                return False
        elif x != y:
            return False
    return True


# ---- crash isolation -------------------------------------------------------------------------------


def _crash_on(cases, bad):
    for case in cases:
        note_case(f"case {case}")
        if case == bad:
            import ctypes

            ctypes.string_at(0)  # a segfault, as a native bug would cause
    return len(cases)


def _raise_value_error(message):
    raise ValueError(message)


def _backend_setting():
    return os.environ.get("REPKERN_BACKEND"), os.environ.get("REPKERN_EMU_SCHEDULE")


def test_isolation_reports_the_crashing_case_and_recovers(monkeypatch):
    assert run_isolated(_crash_on, [1, 2, 3], None) == 3
    with pytest.raises(WorkerCrash, match=r"_crash_on: the isolated worker process killed by SIGSEGV in case: case 2"):
        run_isolated(_crash_on, [1, 2, 3], 2)
    assert run_isolated(_crash_on, [4], None) == 1  # a fresh worker
    with pytest.raises(ValueError, match="from the worker"):
        run_isolated(_raise_value_error, "from the worker")
    monkeypatch.setenv("REPKERN_BACKEND", "emu")
    monkeypatch.setenv("REPKERN_EMU_SCHEDULE", "reverse")
    assert run_isolated(_backend_setting) == ("emu", "reverse")
    monkeypatch.delenv("REPKERN_BACKEND")
    monkeypatch.delenv("REPKERN_EMU_SCHEDULE")
    assert run_isolated(_backend_setting) == (None, None)
