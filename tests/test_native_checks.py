"""Every native entry point checks every index it dereferences, whatever the Python layer did
(csrc/common/index_check.h): the CPU kernels raise ValueError, the CUDA kernels (run here by the emulator)
skip a bad index and set a bit in the op's error word, which the op turns into ValueError.

Crashes are possible when a check is missing, so the reproducers run in a child process
(tests/isolation.py): a segfault fails one test, not the session."""

from __future__ import annotations

import re

import pytest
import torch

import repkern
from repkern import CsrCodes, SparseCodes, _native
from repkern._constants import INDEX_ERRORS
from repkern.ops import cka_test as cka_test_ops
from repkern.ops import sae as sae_ops
from tests.conftest import upper_shares
from tests.isolation import assert_snippet

BIT = {message.split(":")[0]: bit for bit, message in INDEX_ERRORS.items()}  # argument name -> error bit


# ---- the reported reproducers, through the public API (child process) -------------------------------

REPRODUCERS = """
    import torch, repkern
    from repkern import CsrCodes, SparseCodes
    torch.manual_seed(0)
    W = torch.randn(32, 8)
    decode = torch.compile(repkern.sae_decode, backend="eager", fullgraph=True)

    def attempt(name, call):
        try:
            out = call()
        except ValueError as exc:
            print(f"{name} -> ValueError: {exc}", flush=True)
        else:
            print(f"{name} -> no error, max |out| = {float(out.abs().max())}", flush=True)

    # SparseCodes with an index outside [0, d_sae = 32): 2**40 used to segfault, 40 to return heap contents
    for index in (2**40, 40, 32, -1):
        codes = SparseCodes(torch.ones(2, 3), torch.tensor([[0, 1, index], [2, 3, 4]]), 32)
        attempt(f"compiled sparse {index}", lambda: decode(codes, W))
    # CsrCodes whose crow_indices claim more entries than exist (or fall, or do not start at 0)
    for crow in ([0, 2, 1000], [0, 2, 1 << 40], [0, 2, 3, 2], [1, 2, 3], [0, -5, 3]):
        crow = torch.tensor(crow)
        codes = CsrCodes(crow, torch.tensor([0, 1, 2]), torch.ones(3), (crow.numel() - 1, 32))
        attempt(f"compiled csr {crow.tolist()}", lambda: decode(codes, W))
        attempt(f"op csr {crow.tolist()}",
                lambda: torch.ops.repkern.sae_decode_sparse(crow, codes.col_indices, codes.values, W, None))
"""


def test_reproducers_raise_instead_of_crashing(backend):
    """torch.compile skips sae_decode's Python index checks: the kernels must catch bad codes."""
    proc = assert_snippet(REPRODUCERS, returncode=0)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 14, proc.stdout
    for line in lines:
        if line.startswith("compiled sparse"):
            assert re.search(r"-> ValueError: codes: .*cols: indices must lie in \[0, K\)", line), line
        else:
            assert re.search(r"-> ValueError: codes: .*crow: CSR row pointers must rise from 0 to nnz", line), line


def test_eager_decode_still_checks_in_python(backend):
    with pytest.raises(ValueError, match=r"codes: indices must lie in \[0, d_sae=32\)"):
        repkern.sae_decode(SparseCodes(torch.ones(2, 3), torch.tensor([[0, 1, 40], [2, 3, 4]]), 32), torch.randn(32, 8))
    with pytest.raises(ValueError, match="crow_indices must rise from 0 to nnz"):
        repkern.sae_decode(CsrCodes(torch.tensor([0, 2, 1000]), torch.tensor([0, 1, 2]), torch.ones(3), (2, 32)),
                           torch.randn(32, 8))


# ---- the custom ops ------------------------------------------------------------------------------------


def test_spmm_and_sddmm_ops_reject_bad_indices(backend):
    vals, dense = torch.ones(3), torch.randn(5, 4)
    crow, cols = torch.tensor([0, 2, 3]), torch.tensor([0, 4, 1])
    out, sums = torch.ops.repkern.sae_spmm(crow, cols, vals, dense, None)
    torch.testing.assert_close(out, torch.stack([dense[0] + dense[4], dense[1]]))
    with pytest.raises(ValueError, match=r"cols: indices must lie in \[0, K\)"):
        torch.ops.repkern.sae_spmm(crow, torch.tensor([0, 5, 1]), vals, dense, None)
    with pytest.raises(ValueError, match="crow: CSR row pointers must rise from 0 to nnz"):
        torch.ops.repkern.sae_spmm(torch.tensor([0, 2, 4]), cols, vals, None, None)  # row sums only: crow still read
    a, b = torch.randn(2, 4), torch.randn(5, 4)
    torch.testing.assert_close(torch.ops.repkern.sae_sddmm(torch.tensor([1, 0]), torch.tensor([4, 0]), a, b),
                               torch.stack([a[1] @ b[4], a[0] @ b[0]]))
    with pytest.raises(ValueError, match=r"rows_of: indices must lie in \[0, R\)"):
        torch.ops.repkern.sae_sddmm(torch.tensor([2, 0]), torch.tensor([4, 0]), a, b)
    with pytest.raises(ValueError, match=r"cols_of: indices must lie in \[0, K\)"):
        torch.ops.repkern.sae_sddmm(torch.tensor([1, 0]), torch.tensor([4, -1]), a, b)


def test_replicate_rows_op_rejects_bad_permutations(backend):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a, b = a + a.T, a @ a.T
    perms = torch.stack([torch.randperm(6, generator=g) for _ in range(3)]).to(torch.int32)
    rows = torch.ops.repkern.replicate_rows(a, b, perms, cka_test_ops.PERMUTE)
    want = torch.stack([upper_shares(a * b[p][:, p]) for p in perms.long()])
    torch.testing.assert_close(rows[:, :, 0], want)
    for bad in (6, -1, 1 << 30):
        broken = perms.clone()
        broken[1, 4] = bad
        with pytest.raises(ValueError, match=r"columns: permutation indices must lie in \[0, n\)"):
            torch.ops.repkern.replicate_rows(a, b, broken, cka_test_ops.PERMUTE)


# ---- the native entries directly (no Python checks at all) ---------------------------------------------


def _raises_or_flags(backend, error, bit, run):
    """CPU entries raise ValueError; CUDA entries (emulator) set `bit` in the error word and return."""
    if backend.is_emu:
        run()
        assert int(error) & bit, f"error word {int(error)} lacks bit {bit}"
    else:
        with pytest.raises(ValueError, match=re.escape(INDEX_ERRORS[bit])):
            run()


@pytest.mark.emu_smoke
@pytest.mark.parametrize("case", ["cols_high", "cols_huge", "cols_negative", "crow_past_nnz", "crow_falls",
                                  "crow_start", "crow_end"])
def test_spmm_entry_checks_every_index(backend, case):
    """The emulator build under AddressSanitizer (scripts/test.sh) reads nothing out of range here."""
    crow, cols = torch.tensor([0, 2, 3]), torch.tensor([0, 4, 1])
    if case.startswith("cols"):
        cols[1] = {"cols_high": 5, "cols_huge": 1 << 40, "cols_negative": -3}[case]
    else:
        crow = {"crow_past_nnz": torch.tensor([0, 2, 900]), "crow_falls": torch.tensor([0, 3, 2]),
                "crow_start": torch.tensor([1, 2, 3]), "crow_end": torch.tensor([0, 1, 2])}[case]
    vals, dense = torch.ones(3), torch.randn(5, 4)
    out, sums, error = torch.full((2, 4), 7.0), torch.empty(2), _native.index_error_word("cpu")
    bit = BIT["cols"] if case.startswith("cols") else BIT["crow"]
    _raises_or_flags(backend, error, bit, lambda: _native.call(sae_ops.SAE_SPMM, torch.device("cpu"), crow, cols,
                                                               vals, dense, None, out, sums, error))
    if backend.is_emu:
        assert torch.isfinite(out).all() and torch.isfinite(sums).all(), "bad entries are skipped, not read"
        if case.startswith("cols"):  # the other entries still count
            torch.testing.assert_close(out[1], dense[1])


def test_sddmm_entry_checks_every_index(backend):
    a, b = torch.randn(2, 4), torch.randn(5, 4)
    for rows_of, cols_of, bit in [([2, 1], [4, 0], BIT["rows_of"]), ([1, 0], [5, 0], BIT["cols_of"]),
                                  ([-1, 0], [1 << 40, 1], BIT["rows_of"] | BIT["cols_of"])]:  # entry 0 is bad
        out, error = torch.full((2,), 7.0), _native.index_error_word("cpu")
        _raises_or_flags(backend, error, bit & -bit, lambda: _native.call(
            sae_ops.SAE_SDDMM, torch.device("cpu"), torch.tensor(rows_of), torch.tensor(cols_of), a, b, out, error))
        if backend.is_emu:
            assert int(error) == bit and out[0] == 0


def test_replicate_rows_entry_checks_every_index(backend):
    a = torch.randn(8, 8, dtype=torch.float64)
    perms = torch.stack([torch.randperm(8) for _ in range(2)]).to(torch.int32)
    for where, bad in [((0, 3), 8), ((1, 0), -7), ((1, 7), 1 << 30)]:  # a row index and column indices
        broken = perms.clone()
        broken[where] = bad
        out, error = torch.empty((2, 8, 1), dtype=torch.float64), _native.index_error_word("cpu")
        _raises_or_flags(backend, error, BIT["columns"], lambda: _native.call(
            cka_test_ops.REPLICATE_ROWS, torch.device("cpu"), cka_test_ops.PERMUTE, a, a, broken, out, error))
        if backend.is_emu:
            assert torch.isfinite(out).all()


def test_sparsify_write_entry_checks_its_positions(backend):
    pre, bias = torch.ones(3, 4), torch.zeros(4)
    offsets = torch.tensor([0, 4, 9])  # row 2's four nonzeros would land at 9..12 of 12: one past the end
    cols, vals, error = torch.zeros(12, dtype=torch.int64), torch.zeros(12), _native.index_error_word("cpu")
    _raises_or_flags(backend, error, BIT["offsets"], lambda: _native.call(
        sae_ops.SAE_SPARSIFY, torch.device("cpu"), pre, bias, None, None, offsets, cols, vals, error, 0))


def test_cpu_entry_called_directly():
    """repkern._C.sae_spmm_cpu with views of its own: ValueError, not a crash."""
    from repkern import _C

    crow, cols, vals = torch.tensor([0, 1]), torch.tensor([1 << 40]), torch.ones(1)
    dense, out, sums, error = torch.randn(3, 2), torch.empty(1, 2), torch.empty(1), _native.index_error_word("cpu")
    views = [_native.view(t) for t in (crow, cols, vals, dense)] + [None, _native.view(out), _native.view(sums),
                                                                    _native.view(error)]
    with pytest.raises(ValueError, match=r"cols: indices must lie in \[0, K\)"):
        _C.sae_spmm_cpu(*views, 1)
