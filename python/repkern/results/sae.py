"""Sparse SAE codes: the two forms ``repkern.sae_encode(..., output="sparse")`` returns.

- :class:`SparseCodes` (TopK): exactly k codes per row, ``values``/``indices`` of
  shape ``(..., k)``, sorted by rank (largest pre-activation first; equal values:
  lower index first).
- :class:`CsrCodes` (ReLU, JumpReLU, BatchTopK): a variable number of nonzero codes
  per row in CSR form over the ``N = prod(shape[:-1])`` rows, columns ascending
  within a row.

Both are NamedTuples of tensors (pytrees: they pass through ``torch.compile``) and
convert with ``to_dense()``; :func:`repkern.sae_decode` takes either directly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class SparseCodes(NamedTuple):
    """TopK codes: ``values (..., k)`` in the weights' dtype, ``indices (..., k)`` int64
    in ``[0, d_sae)``."""

    values: Tensor
    indices: Tensor
    d_sae: int

    def to_dense(self) -> Tensor:
        """``(..., d_sae)``, zeros where no code was kept (differentiable w.r.t. values)."""
        check_sparse_codes(self)
        zeros = self.values.new_zeros((*self.values.shape[:-1], self.d_sae))
        return zeros.scatter(-1, self.indices, self.values)

    def to_sparse_coo(self) -> Tensor:
        """A ``torch.sparse_coo_tensor`` of the dense shape ``(..., d_sae)``, coalesced,
        holding all k codes of each row (a code that the ReLU made 0 stays stored)."""
        check_sparse_codes(self)
        batch_shape, k = tuple(self.values.shape[:-1]), self.values.shape[-1]
        rows = torch.arange(math.prod(batch_shape), device=self.indices.device).repeat_interleave(k)
        batch_index = torch.unravel_index(rows, batch_shape) if batch_shape else ()
        indices = torch.stack([*batch_index, self.indices.reshape(-1)])
        # check_invariants: codes built by hand could hold out-of-range indices, which would corrupt memory
        return torch.sparse_coo_tensor(indices, self.values.reshape(-1), (*batch_shape, self.d_sae),
                                       check_invariants=True).coalesce()


class CsrCodes(NamedTuple):
    """Row r of the flattened batch holds ``values[crow_indices[r]:crow_indices[r+1]]``
    at columns ``col_indices[...]`` (ascending). ``shape`` is the dense shape
    ``(..., d_sae)``."""

    crow_indices: Tensor  # (N + 1,) int64
    col_indices: Tensor  # (nnz,) int64
    values: Tensor  # (nnz,)
    shape: tuple

    def row_indices(self) -> Tensor:
        """``(nnz,)`` int64: the row of each stored code."""
        n = self.crow_indices.numel() - 1
        rows = torch.arange(n, device=self.crow_indices.device)
        return rows.repeat_interleave(self.crow_indices.diff(), output_size=self.col_indices.numel())

    def to_dense(self) -> Tensor:
        """``shape``, zeros where nothing is stored (differentiable w.r.t. values)."""
        check_csr_codes(self)
        n, d_sae = math.prod(self.shape[:-1]), self.shape[-1]
        dense = self.values.new_zeros((n, d_sae)).index_put((self.row_indices(), self.col_indices), self.values)
        return dense.reshape(self.shape)

    def to_sparse_csr(self) -> Tensor:
        """A ``torch.sparse_csr_tensor`` of shape ``(N, d_sae)``: the codes' own CSR arrays,
        with the batch dims flattened into the N rows (reshape its dense form to ``shape``)."""
        check_csr_codes(self)
        n, d_sae = math.prod(self.shape[:-1]), self.shape[-1]
        # check_invariants: as in SparseCodes.to_sparse_coo
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values, (n, d_sae),
                                       check_invariants=True)


def check_sparse_codes(codes: SparseCodes, name: str = "codes") -> None:
    """The structure of SparseCodes (not the index values): tensors of at least one dim, a positive int
    d_sae. ValueError / TypeError naming the field."""
    for field in ("values", "indices"):
        t = getattr(codes, field)
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}.{field}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 1:
            raise ValueError(f"{name}.{field}: expected shape (..., k), got a 0-d tensor")
    if isinstance(codes.d_sae, bool) or not isinstance(codes.d_sae, (int, torch.SymInt)) or codes.d_sae < 1:
        raise ValueError(f"{name}.d_sae: expected an int >= 1, got {codes.d_sae!r}")


def check_csr_codes(codes: CsrCodes, name: str = "codes") -> None:
    """The structure of CsrCodes: 1-d crow/col/values tensors and a dense shape (..., d_sae) of at least one
    int >= 0 (d_sae >= 1). ValueError / TypeError naming the field."""
    for field in ("crow_indices", "col_indices", "values"):
        t = getattr(codes, field)
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}.{field}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name}.{field}: expected a 1-d tensor, got shape {tuple(t.shape)}")
    shape = codes.shape
    if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) < 1
            or any(isinstance(s, bool) or not isinstance(s, (int, torch.SymInt)) or s < 0 for s in shape)
            or shape[-1] < 1):
        raise ValueError(f"{name}.shape: expected the dense shape (..., d_sae) with d_sae >= 1, got {shape!r}")
