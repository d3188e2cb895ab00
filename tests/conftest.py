"""Shared fixtures: every op test runs on each available backend.

Backends: ``cpu`` (C++ kernels at the best instruction-set level this CPU runs,
or the one REPKERN_CPU_ISA forces), ``cpu-<level>`` for each lower compiled level
this CPU also runs (an AVX-512 host tests the AVX2 and baseline copies too),
``emu-forward`` / ``emu-reverse`` (the CUDA kernels on CPU tensors through
repkern._emu under two thread schedules), and ``cuda`` when a GPU and a CUDA
build are present.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import repkern

pytest_plugins = ["tests.emu_coverage"]  # emulator coverage of every barrier / warp collective
EMU_SCHEDULES = ("forward", "reverse")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    device: torch.device

    @property
    def is_emu(self) -> bool:
        return self.name.startswith("emu")


def lower_cpu_isas() -> list:
    """Compiled CPU levels this host runs, below the best one (which the plain ``cpu`` backend uses)."""
    return repkern.build_info()["cpu_isas_supported"][:-1]


def _backend_names():
    names = ["cpu"] + [f"cpu-{isa}" for isa in lower_cpu_isas()] + [f"emu-{s}" for s in EMU_SCHEDULES]
    if torch.cuda.is_available() and repkern.build_info()["cuda"]:
        names.append("cuda")
    return names


@pytest.fixture(params=_backend_names())
def backend(request, monkeypatch) -> Backend:
    name = request.param
    monkeypatch.delenv("REPKERN_BACKEND", raising=False)
    if name.startswith("cpu-"):
        monkeypatch.setenv("REPKERN_CPU_ISA", name.split("-", 1)[1])
    if name.startswith("emu"):
        monkeypatch.setenv("REPKERN_BACKEND", "emu")
        monkeypatch.setenv("REPKERN_EMU_SCHEDULE", name.split("-", 1)[1])
    return Backend(name, torch.device("cuda" if name == "cuda" else "cpu"))


@pytest.fixture(params=[None] + lower_cpu_isas(), ids=lambda isa: f"cpu-{isa}" if isa else "cpu")
def cpu_isa(request, monkeypatch):
    """CPU-only kernels: the best level this CPU runs (None), then each lower compiled level it runs."""
    monkeypatch.delenv("REPKERN_BACKEND", raising=False)
    if request.param:
        monkeypatch.setenv("REPKERN_CPU_ISA", request.param)
    return request.param


def at_thread_counts(fn, counts=(1, 2, 3, 4)) -> list:
    """fn() at each torch thread count (the setting restored after): for results that must not depend on it."""
    threads = torch.get_num_threads()
    try:
        results = []
        for t in counts:
            torch.set_num_threads(t)
            results.append(fn())
    finally:
        torch.set_num_threads(threads)
    return results


@pytest.fixture(params=("ops", "reference"))
def impl(request, monkeypatch) -> str:
    """The public op's fast path (`ops`) or the whole call through `repkern.reference`
    (REPKERN_BACKEND=reference): for ops whose tests check both against independent oracles."""
    monkeypatch.delenv("REPKERN_BACKEND", raising=False)
    if request.param == "reference":
        monkeypatch.setenv("REPKERN_BACKEND", "reference")
    return request.param


def assert_close_to_reference(fast: torch.Tensor, ref_low: torch.Tensor, ref64: torch.Tensor, *, atol64=1e-9):
    """float32/float64: close to the reference. float16/bfloat16: error against the
    float64 reference at most 2× that of the reference run in the same precision."""
    assert fast.dtype == ref_low.dtype and fast.shape == ref64.shape
    fast64, low64 = fast.double(), ref_low.double()
    nan_fast, nan_ref = torch.isnan(fast64), torch.isnan(ref64)
    assert torch.equal(nan_fast, nan_ref), "NaN pattern differs from the reference"
    fast64, low64, ref64 = (t.nan_to_num(0.0) for t in (fast64, low64, ref64))
    if fast.dtype == torch.float64:
        torch.testing.assert_close(fast64, ref64, rtol=1e-10, atol=atol64)
    elif fast.dtype == torch.float32:
        torch.testing.assert_close(fast64, ref64, rtol=2e-5, atol=2e-5 * max(1.0, ref64.abs().max().item()))
    else:
        err = (fast64 - ref64).abs().max().item()
        ref_err = (low64 - ref64).abs().max().item()
        floor = torch.finfo(fast.dtype).eps * max(1.0, ref64.abs().max().item())
        assert err <= 2 * ref_err + floor, f"{fast.dtype}: error {err:.3g} > 2 × reference error {ref_err:.3g}"


def _gloo_rank(rank: int, world: int, port: int, worker, verdicts: str) -> None:
    import datetime
    import pathlib
    import traceback

    import torch.distributed as dist

    verdict = pathlib.Path(verdicts) / str(rank)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))  # a failing rank cannot hang the other
        torch.set_num_threads(1)
        worker(rank, world)
        dist.barrier()  # the peer's last collective is complete before anyone tears down
        verdict.write_text("ok")
    except BaseException:
        verdict.write_text(traceback.format_exc())
        raise
    dist.destroy_process_group()


def run_gloo_processes(worker, world: int = 2) -> None:
    """Runs worker(rank, world) in `world` processes joined by a gloo process group on localhost.
    `worker` must be a module-level function (it is pickled into spawned processes).

    Each rank writes its own verdict (``ok`` or its traceback) before the process group is torn
    down, and the test judges those: torch's gloo teardown can abort a process that has already
    passed ("terminate called without an active exception", seen once under load in CI, after the
    barrier). Such an exit is reported as a warning; a rank without an ``ok`` fails the test."""
    import os
    import pathlib
    import socket
    import tempfile
    import warnings

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as verdicts:
        context = mp.start_processes(_gloo_rank, args=(world, port, worker, verdicts), nprocs=world,
                                     join=False, start_method="spawn")
        for process in context.processes:
            process.join(timeout=600)
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
        said = {}
        for rank, process in enumerate(context.processes):
            path = pathlib.Path(verdicts) / str(rank)
            said[rank] = path.read_text() if path.exists() else f"no verdict (exit code {process.exitcode})"
        failed = {rank: text for rank, text in said.items() if text != "ok"}
        assert not failed, "\n".join(f"rank {rank}: {text}" for rank, text in failed.items())
        for rank, process in enumerate(context.processes):
            if process.exitcode != 0:
                warnings.warn(f"rank {rank} passed, then exited with {process.exitcode} in torch's gloo "
                              "teardown", RuntimeWarning, stacklevel=2)


def upper_shares(p: torch.Tensor) -> torch.Tensor:
    """Rows of cka_test's Permute kernel output for the products P (n, n) of one replicate:
    P_ii + 2 Σ_{j>i} P_ij (csrc/common/cka_test_math.h); they add up to Σ_ij P_ij."""
    return p.diagonal() + 2 * p.triu(1).sum(1)


class Gathered(Exception):
    """Raised by gather_devices' stand-in for all_gather_states once it has seen the packed state."""


def gather_devices(monkeypatch, module) -> list:
    """Replaces `module`'s group_device (a "meta" group) and all_gather_states (records the packed
    state's device, then raises Gathered); returns the list the devices are recorded in. For the check
    that an accumulator without data gathers on the group's device: NCCL takes CUDA tensors only, so a
    rank with no data must not offer a CPU tensor there."""
    seen = []

    def fake_gather(packed, signature, group=None):
        seen.append(packed.device)
        raise Gathered

    monkeypatch.setattr(module, "group_device", lambda group=None: torch.device("meta"))
    monkeypatch.setattr(module, "all_gather_states", fake_gather)
    return seen
