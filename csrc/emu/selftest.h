// Kernels that exercise the emulator itself: correct use of every primitive,
// and planted bugs it must report. Compiled only into repkern._emu.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace repkern::emu_selftest {

// Tree sum of x[0..n) in one block of n threads (n a power of two <= 1024),
// with or without the barrier between levels.
void block_sum(const float* x, float* out, int n, bool with_barrier);

// One warp per block, `blocks` blocks. Per lane (index = block*32 + lane):
//  out_i [*, 10]: shfl idx(src=lane^3)(width 32), idx(src 0, width 8), up 1, down 2 (width 16),
//                 xor 4, ballot(lane odd), any(lane == 5), all(lane < 32), all(lane < 31),
//                 dynamic-smem neighbour value
//  out_f [*, 2]: float shfl_down(1) of lane*0.5, double xor(1) of lane
//  sums [2]: float and double atomicAdd of (lane + 1) over all threads
void warp_ops(int blocks, int32_t* out_i, float* out_f, double* out_d, float* sum_f, double* sum_d);

// order[k] = linear id (block * threads + thread) of the k-th thread to start.
void schedule_order(int blocks, int threads, int32_t* order);

// Static shared memory is poisoned before every block: `blocks` blocks of 64 threads of
// two instantiations (32 and 64 words of RK_SHARED int32); each thread records what it
// reads before any write of its block: out [2, blocks * 64], all -1 (0xFFFFFFFF bytes).
// Each block then writes its own values, which the next block must not see.
void static_smem_poison(int blocks, int32_t* out);

// Coverage counting: `blocks` blocks of 64 threads run a loop `iterations` times with a
// barrier, a shuffle and a ballot in it; outside it one barrier and (warp 0) one __syncwarp.
// out [blocks * 64]: Σ over iterations of the neighbour lane's value (proof that it ran).
void coverage_loop(int blocks, int iterations, int32_t* out);

// Warps run ahead: one block of 32·warps threads; each thread takes a ticket (atomic counter)
// before and after a __syncwarp: order [threads, 2].
void run_ahead(int warps, int32_t* order);

// The emulator's coverage of barriers and warp collectives (emu.h: repkern_emu::coverage),
// exposed here because bindings.cpp is not compiled against emu.h.
struct CoverageRecord {
  std::string kernel, file;
  int line = 0;
  std::string what, function;
  uint64_t max_passes = 0;  // most times one thread of one block passed the site
};
std::vector<CoverageRecord> coverage();
void reset_coverage();
struct SharedRegionRecord {
  std::string file;
  int line = 0;
  std::string name;
};
std::vector<SharedRegionRecord> shared_regions();

// Planted bugs; each must raise an error naming its kind and file:line.
enum class Bug : int {
  ShflMaskPartial = 0,   // full mask inside `if (lane < 16)`
  ShflMaskAbsent = 1,    // full mask in a 16-thread block
  ShflReadsOutside = 2,  // mask of 16 lanes, shuffle reads lane 16+
  MaskWithoutSelf = 3,   // lane calls with a mask that excludes it
  BarrierAfterExit = 4,  // thread 0 returns before __syncthreads
  BarrierDivergent = 5,  // two different __syncthreads in an if/else
  SmemOverLimit = 6,     // 64 KiB dynamic shared memory without opt-in
  GridTooLarge = 7,      // gridDim.y > 65535
};
void planted_bug(Bug bug, float* scratch /* [64] */);

// REPKERN_EMU_SCHEDULE as the next launch reads it: std::invalid_argument naming the variable if unusable.
void check_schedule();

}  // namespace repkern::emu_selftest
