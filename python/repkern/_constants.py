"""Enums and constants the native core defines, read from repkern._C (one definition, in csrc/): the Gram
kinds and passes, the cka_test replicate modes, the SAE top-k limit, the sparsity layouts and limits.
Argument validation and the reference read the API limits and conventions here without depending on any
kernel."""

from __future__ import annotations

import enum

try:
    from repkern import _C
except ImportError as exc:  # pragma: no cover - a broken install
    raise ImportError(
        "repkern's native module repkern._C is missing or does not load; reinstall with "
        "`pip install .` from the source tree (needs a C++ compiler and CMake)."
    ) from exc


def _int_enum(native) -> type[enum.IntEnum]:
    """A Python IntEnum with the native enum's names and values (torch.compile traces IntEnums as constants)."""
    return enum.IntEnum(native.__name__, {name: int(value) for name, value in native.__members__.items()})


GramKind = _int_enum(_C.GramKind)
GramPass = _int_enum(_C.GramPass)
ReplicateMode = _int_enum(_C.ReplicateMode)
REPLICATE_CHANNELS = {ReplicateMode(mode): channels for mode, channels in _C.REPLICATE_CHANNELS.items()}
DTYPE_CODES = dict(_C.DTYPE_CODES)  # dtype name -> code of the tensor views
INDEX_ERRORS = dict(_C.INDEX_ERRORS)  # bit of the gathers' error word -> message (csrc/common/index_check.h)

SAE_MAX_TOPK = _C.SAE_MAX_TOPK  # largest k of the native top-k merge; larger k merge in torch
KNN_MAX_K = _C.KNN_MAX_K  # largest k of the native kNN merge; larger k merge in torch

SPARSITY_FEATURE_FIELDS = tuple(_C.SPARSITY_FEATURE_FIELDS)  # rows of the per-feature state
SPARSITY_ROW_COUNTS = tuple(_C.SPARSITY_ROW_COUNTS)  # rows of the int64 row counts (l0, nonfinite)
SPARSITY_ROW_CHANNELS = tuple(_C.SPARSITY_ROW_CHANNELS)  # row outputs, then top_p_l1[P], top_p_l2[P]
SPARSITY_SORT_FREE_CHANNELS = _C.SPARSITY_SORT_FREE_CHANNELS  # the one-read subset: the first channels
SPARSITY_ROW_TOTALS = _C.SPARSITY_ROW_TOTALS
SPARSITY_ORDERED_SUMS = _C.SPARSITY_ORDERED_SUMS
SPARSITY_MAX_TOP_P = _C.SPARSITY_MAX_TOP_P
SPARSITY_TOP_K_TOLERANCE = _C.SPARSITY_TOP_K_TOLERANCE  # top p = the ceil(p·n − this) largest |a|


def sparsity_row_channels(num_top_p: int, ordered: bool) -> int:
    """Rows of the row-output tensor."""
    return len(SPARSITY_ROW_CHANNELS) + 2 * num_top_p if ordered else SPARSITY_SORT_FREE_CHANNELS
