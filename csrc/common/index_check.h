// Index validation of the kernels that read or write through index arrays (sae_spmm, sae_sddmm,
// sae_sparsify's write pass, replicate_rows' permutations).
//
// Every native entry point checks every index it dereferences, whatever the Python layer did:
//  - CPU launchers check on the host before (or while) they run and throw std::invalid_argument
//    (ValueError in Python) with the message of the failed check;
//  - CUDA kernels (and the emulator running them) cannot raise: each checks the indices it reads, never
//    dereferences one out of range (the entry is skipped), and ORs the bit of the failed check into an
//    int32 error word (`error`, one element, zero-filled by the caller). The Python op reads that word
//    after the launch (one device-to-host sync) and raises ValueError with the messages below.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace repkern {

enum IndexError : int32_t {
  kBadCrow = 1,          // sae_spmm: row pointers
  kBadCols = 2,          // sae_spmm: column indices (rows of dense)
  kBadRowsOf = 4,        // sae_sddmm: rows of a
  kBadColsOf = 8,        // sae_sddmm: rows of b
  kBadOffsets = 16,      // sae_sparsify: output positions
  kBadPermutation = 32,  // replicate_rows: permutation indices
};

struct IndexErrorMessage {
  IndexError bit;
  const char* message;
};

// Internal linkage (not `inline`): each CPU instruction-set copy keeps its own (CMakeLists.txt makes them local).
constexpr IndexErrorMessage kIndexErrorMessages[] = {
    {kBadCrow, "crow: CSR row pointers must rise from 0 to nnz = len(cols)"},
    {kBadCols, "cols: indices must lie in [0, K), K = rows of dense"},
    {kBadRowsOf, "rows_of: indices must lie in [0, R), R = rows of a"},
    {kBadColsOf, "cols_of: indices must lie in [0, K), K = rows of b"},
    {kBadOffsets, "offsets: output positions must lie in [0, nnz), nnz = len(out_cols)"},
    {kBadPermutation, "columns: permutation indices must lie in [0, n)"},
};

// The messages of the bits set in `flags`, joined by "; ".
inline std::string index_error_message(int32_t flags) {
  std::string out;
  for (const IndexErrorMessage& m : kIndexErrorMessages) {
    if (flags & m.bit) out += (out.empty() ? "" : "; ") + std::string(m.message);
  }
  return out;
}

[[noreturn]] inline void throw_index_error(IndexError bit) {
  throw std::invalid_argument(index_error_message(bit));
}

// Host checks of the CPU launchers (one pass over the indices; their kernels then read them unchecked).

// crow [rows + 1]: crow[0] = 0, non-decreasing, crow[rows] = nnz.
inline void check_csr(const int64_t* crow, int64_t rows, int64_t nnz) {
  if (crow[0] != 0 || crow[rows] != nnz) throw_index_error(kBadCrow);
  for (int64_t r = 0; r < rows; ++r)
    if (crow[r + 1] < crow[r]) throw_index_error(kBadCrow);
}

// Every idx[i] in [0, bound).
template <typename I>
void check_indices(const I* idx, int64_t count, int64_t bound, IndexError bit) {
  int bad = 0;
  for (int64_t i = 0; i < count; ++i) bad |= int(idx[i] < 0) | int(int64_t(idx[i]) >= bound);
  if (bad) throw_index_error(bit);
}

}  // namespace repkern
