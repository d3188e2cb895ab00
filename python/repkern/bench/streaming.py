"""Streaming and minibatch CKA benchmarks, same run.

Providers:
  repkern          StreamingCKA / MinibatchCKA fed batch by batch
  repkern-oneshot  cka_matrix over the concatenated batches (all data in memory at once)
  reference        plain PyTorch: feature-space linear CKA per pair over the concatenated data
                   (StreamingCKA); reference.minibatch_cka (MinibatchCKA); for the update cases,
                   StreamingCKA with one GEMM per pair of layers and batch, each pair's statistics
                   moved and added on their own (:class:`PerPairStreamingCKA`)

Cases:
  StreamingCKA, linear (biased, debiased), 4 + 4 layers d=256, N=16384 in batches of 2048
  MinibatchCKA, RBF debiased, 4 layers d=256, 8 batches of 512
  StreamingCKA updates (biased, debiased), 7 + 7 layers d=384 (two MiniLM-sized models), 8 batches of
  512 tokens, then the held rows added: StreamingCKA (batches held and added together, one GEMM per layer
  against all its partners) against the per-pair update (every batch on its own, one GEMM per pair)
GPU (CUDA device): StreamingCKA 4 + 4 layers d=1024, N=262144 in batches of 16384; MinibatchCKA 4
  layers d=1024, 16 batches of 4096; the updates of 7 + 7 layers d=384 in 16 batches of 4096.
Default dtype float32; ``dtypes`` runs every case in each of them.

``python -m repkern.bench.streaming [rounds]`` times the two CPU update cases alone, repkern and the
per-pair update alternating in one process, and prints their medians and ratios.
"""

from __future__ import annotations

import statistics
import sys
from typing import Optional, Sequence

import torch

import repkern
from repkern import _common, reference
from repkern.bench import Case, generator, select_dtypes
from repkern.bench.timing import alternating_ms
from repkern.ops import streaming

FEW = {"warmup": 1, "min_repeats": 2, "max_repeats": 3, "min_time_s": 0.0}


def _model(count: int, n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int) -> list[torch.Tensor]:
    g = generator(device, seed)
    x = torch.randn(n, d, generator=g, device=device)
    layers = []
    for _ in range(count):
        w = torch.randn(d, d, generator=g, device=device) / d**0.5
        x = torch.tanh(x @ w) + 0.3 * torch.randn(n, d, generator=g, device=device) + 1.0
        layers.append(x.to(dtype))
    return layers


def _streaming_case(debiased: bool, layers: int, n: int, d: int, batch: int, dtype, device, timing) -> Case:
    def build():
        xs, ys = _model(layers, n, d, dtype, device, 0), _model(layers, n, d, dtype, device, 1)
        batches = list(zip(zip(*[t.split(batch) for t in xs]), zip(*[t.split(batch) for t in ys])))

        def stream():
            acc = repkern.StreamingCKA(debiased=debiased)
            for bx, by in batches:
                acc.update(bx, by)
            return acc.compute()

        def per_pair():
            return [[reference.feature_space_linear_cka(x, y, debiased=debiased) for y in ys] for x in xs]

        return {"repkern": stream,
                "repkern-oneshot": lambda: repkern.cka_matrix(xs, ys, debiased=debiased, method="feature"),
                "reference": per_pair}

    pairs = layers * layers + 2 * layers  # cross pairs and self pairs: d×d products each
    return Case(op=f"StreamingCKA[linear{' debiased' if debiased else ''}]",
                shape=f"{layers}+{layers} layers N={n} d={d} b={batch}", dtype=dtype,
                providers=("repkern", "repkern-oneshot", "reference"), build=build,
                flops=2.0 * n * d * d * pairs, timing=timing)


def _pair_shift(stats: dict, deltas: list[torch.Tensor], n: int, pairs: list[tuple[int, int]], debiased: bool) -> dict:
    """``repkern.ops.streaming._shift`` pair by pair: each pair's statistics moved on their own."""
    out = dict(stats)
    sums = [stats[f"sum/{a}"] for a in range(len(deltas))]
    kappa = [d @ d for d in deltas]
    traces = {a: torch.diagonal(stats[f"M/{a},{a}"]).sum() for a in range(len(deltas))}
    sum_dot = [s @ d for s, d in zip(sums, deltas)]
    if debiased:
        p_new = stats["P"].clone()
    for p, (a, b) in enumerate(pairs):
        m = stats[f"M/{a},{b}"]
        da, db, ka, kb = deltas[a], deltas[b], kappa[a], kappa[b]
        if debiased:
            g, h = stats[f"g/{a},{b}"], stats[f"h/{a},{b}"]
            p_new[p] = (stats["P"][p] + 2 * (db @ g) + 2 * (da @ h) + 4 * (da @ (m @ db)) + kb * traces[a]
                        + ka * traces[b] + 2 * kb * sum_dot[a] + 2 * ka * sum_dot[b] + n * ka * kb)
            out[f"g/{a},{b}"] = g + traces[a] * db + 2 * (m.T @ da) + 2 * sum_dot[a] * db + ka * sums[b] + n * ka * db
            out[f"h/{a},{b}"] = h + traces[b] * da + 2 * (m @ db) + 2 * sum_dot[b] * da + kb * sums[a] + n * kb * da
        out[f"M/{a},{b}"] = torch.addr(m, sums[a], db).addr_(da, sums[b] + n * db)
    if debiased:
        out["P"] = p_new
    for a, d in enumerate(deltas):
        out[f"sum/{a}"] = sums[a] + n * d
        out[f"shift/{a}"] = stats[f"shift/{a}"] - d
    return out


class PerPairStreamingCKA(repkern.StreamingCKA):
    """StreamingCKA with the per-pair update, the baseline of the row-block one: per batch one GEMM
    z_aᵀ z_b per pair of layers, and each pair's statistics moved onto the state's shift and added on
    their own. Same statistics and state format."""

    def _hold_capacity(self, layout, dtype):
        super()._hold_capacity(layout, dtype)  # the budget check
        return 0  # every batch on its own

    def _add(self, stats, layout, samples, batches, float64, owned=False):
        super()._add(stats, layout, samples, batches, float64)  # the first batch's statistics copied, as it did

    def _batch_stats(self, layers, layout, held=None):
        acc = _common.acc_dtype(layers[0].dtype)
        stats, zs, norms, zs64 = {}, [], [], []
        for a, t in enumerate(layers):
            ta = t.to(acc)
            mean = ta.mean(0)
            z = ta - mean
            zs.append(z)
            stats[f"shift/{a}"] = mean.double()
            stats[f"sum/{a}"] = z.sum(0).double()
            if self.debiased:
                zs64.append(z.double())
                norms.append(z.square().sum(-1, dtype=torch.float64))
        pairs = streaming._streaming_pairs(layout)
        for a, b in pairs:
            stats[f"M/{a},{b}"] = (zs[a].T @ zs[b]).double()
            if self.debiased:
                stats[f"g/{a},{b}"] = zs64[b].T @ norms[a]
                stats[f"h/{a},{b}"] = zs64[a].T @ norms[b]
        if self.debiased:
            stats["P"] = torch.stack([norms[a] @ norms[b] for a, b in pairs])
        return stats

    def _combine(self, theirs, their_samples):
        pairs = streaming._streaming_pairs(self._layout)
        count = len(streaming._positional_layers(self._layout))
        deltas = [theirs[f"shift/{a}"] - self._stats[f"shift/{a}"] for a in range(count)]
        moved = _pair_shift(theirs, deltas, their_samples, pairs, self.debiased)
        for key, _ in self._stat_shapes(self._layout):
            if not key.startswith("shift/"):
                self._stats[key].add_(moved[key])


def _update_case(debiased: bool, layers: int, batches: int, batch: int, d: int, dtype, device, timing) -> Case:
    def build():
        n = batches * batch
        xs, ys = _model(layers, n, d, dtype, device, 3), _model(layers, n, d, dtype, device, 4)
        split = list(zip(zip(*[t.split(batch) for t in xs]), zip(*[t.split(batch) for t in ys])))

        def feed(cls):
            acc = cls(debiased=debiased)
            for bx, by in split:
                acc.update(bx, by)
            acc._flush()  # repkern's held rows added (as the next read of the state would), timed with the updates
            return acc

        return {"repkern": lambda: feed(repkern.StreamingCKA), "reference": lambda: feed(PerPairStreamingCKA)}

    pairs = layers * layers + 2 * layers  # cross pairs and self pairs: a d×d product each per batch
    return Case(op=f"StreamingCKA.update[linear{' debiased' if debiased else ''}]",
                shape=f"{layers}+{layers} layers {batches}x b={batch} d={d}", dtype=dtype,
                providers=("repkern", "reference"), build=build,
                flops=2.0 * batches * batch * d * d * pairs, timing=timing)


def _minibatch_case(layers: int, batches: int, batch: int, d: int, dtype, device, timing) -> Case:
    def build():
        xs = _model(layers, batches * batch, d, dtype, device, 2)
        split = list(zip(*[t.split(batch) for t in xs]))

        def minibatch():
            acc = repkern.MinibatchCKA("rbf")
            for bx in split:
                acc.update(bx)
            return acc.compute()

        return {"repkern": minibatch,
                "reference": lambda: reference.minibatch_cka([(list(b), None) for b in split], "rbf")}

    return Case(op="MinibatchCKA[rbf debiased]", shape=f"{layers} layers {batches}x b={batch} d={d}", dtype=dtype,
                providers=("repkern", "reference"), build=build,
                flops=2.0 * layers * batches * batch * batch * d, timing=timing)


def cases(device: torch.device, quick: bool, dtypes: Optional[Sequence[torch.dtype]] = None,
          full: bool = False) -> list[Case]:
    out = []
    for dtype in select_dtypes(dtypes, [torch.float32]):
        if quick:
            out += [
                _streaming_case(True, 2, 4096, 64, 1024, dtype, device, FEW),
                _minibatch_case(2, 4, 256, 64, dtype, device, FEW),
                _update_case(True, 2, 4, 256, 64, dtype, device, FEW),
            ]
        elif device.type == "cuda":
            out += [
                _streaming_case(False, 4, 262144, 1024, 16384, dtype, device, FEW),
                _streaming_case(True, 4, 262144, 1024, 16384, dtype, device, FEW),
                _minibatch_case(4, 16, 4096, 1024, dtype, device, FEW),
                _update_case(False, 7, 16, 4096, 384, dtype, device, FEW),
                _update_case(True, 7, 16, 4096, 384, dtype, device, FEW),
            ]
        else:
            out += [
                _streaming_case(False, 4, 16384, 256, 2048, dtype, device, FEW),
                _streaming_case(True, 4, 16384, 256, 2048, dtype, device, FEW),
                _minibatch_case(4, 8, 512, 256, dtype, device, FEW),
                _update_case(False, 7, 8, 512, 384, dtype, device, FEW),
                _update_case(True, 7, 8, 512, 384, dtype, device, FEW),
            ]
    return out


def _main(rounds: int) -> None:
    device = torch.device("cpu")
    print(f"{torch.get_num_threads()} threads, {rounds} alternating rounds")
    for debiased in (False, True):
        case = _update_case(debiased, 7, 8, 512, 384, torch.float32, device, {})
        times = alternating_ms(case.make(), device, rounds)
        median = {name: statistics.median(ms) for name, ms in times.items()}
        ratios = [old / new for new, old in zip(times["repkern"], times["reference"])]
        print(f"{case.op} {case.shape}: repkern {median['repkern']:.1f} ms, per-pair {median['reference']:.1f} ms, "
              f"per-pair / repkern {median['reference'] / median['repkern']:.2f} (per round: median "
              f"{statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    _main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
