"""The benchmark package without a GPU: a real CPU quick run of one suite (CSV + JSON), --compare,
the GPU case lists (listed, never built), the L2 flush between timed CUDA runs, out-of-memory
cases reported as skipped rows, option and output-path errors."""

from __future__ import annotations

import csv
import importlib
import json

import pytest
import torch
from torch.overrides import TorchFunctionMode

import repkern
from repkern import bench
from repkern.__main__ import main
from repkern.bench import Case, report, timing
from repkern.bench.timing import Ceilings

# ---- a real run: CPU, quick, one suite --------------------------------------------------------


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "out" / "sae.csv"
    assert main(["bench", "--op", "sae", "--quick", "--device", "cpu", "--csv", str(path)]) == 0
    return path


def test_quick_run_writes_csv_and_json(sae_run):
    rows = list(csv.DictReader(open(sae_run)))
    assert tuple(rows[0]) == bench.CSV_FIELDS
    for column in ("device_name", "driver", "torch", "matmul_ceiling_gflops", "status", "cuda_runtime"):
        assert column in rows[0]
    payload = json.load(open(sae_run.with_suffix(".json")))
    assert payload["format"] == "repkern-bench" and payload["format_version"] == 1
    header = payload["header"]
    assert header["device"] == "cpu" and header["torch"] == torch.__version__
    assert header["repkern"] == repkern.__version__
    assert header["cpu_model"] == timing.cpu_model() and header["threads"] == torch.get_num_threads()
    assert header["device_name"] == f"{timing.cpu_model()} ({torch.get_num_threads()} threads)"
    assert header["driver"] == "" and header["suites"] == ["sae"] and header["quick"] is True
    sha, source = timing.build_sha()
    assert header["git_sha"] == sha and header["git_sha_source"] == source
    ceilings = header["ceilings"]
    assert ceilings["matmul_gflops"]["float32"] > 0 and ceilings["copy_gbps"] > 0 and ceilings["read_gbps"] > 0
    # the JSON holds the CSV's rows
    assert len(payload["rows"]) == len(rows)
    for from_json, from_csv in zip(payload["rows"], rows):
        assert {k: "" if v is None else str(v) for k, v in from_json.items()} == from_csv
    providers = {(r["op"], r["provider"]) for r in rows}
    assert ("sae_encode[topk->sparse]", "gemm_only") in providers and ("sae_decode[topk]", "reference") in providers
    for r in rows:
        assert r["status"] == "ok" and r["device"] == "cpu" and r["device_name"] == header["device_name"]
        assert r["torch"] == torch.__version__ and r["git_sha"] == sha and r["suite"] == "sae"
        assert float(r["matmul_ceiling_gflops"]) == pytest.approx(ceilings["matmul_gflops"][r["dtype"]], abs=0.051)
        if r["gflops"]:  # the fraction is of the matmul in the row's own dtype
            ratio = float(r["gflops"]) / ceilings["matmul_gflops"][r["dtype"]]
            assert float(r["matmul_fraction"]) == pytest.approx(ratio, rel=0.02, abs=2e-3)
    assert any(r["gbps"] for r in rows) and any(r["gflops"] for r in rows)


def test_build_sha_is_the_builds_commit(monkeypatch):
    monkeypatch.setattr(repkern, "build_info", lambda: {"git_sha": "0123abc", "cuda": False})
    monkeypatch.setattr(timing, "git_sha", lambda: pytest.fail("the working directory's commit was read"))
    assert timing.build_sha() == ("0123abc", "build")
    monkeypatch.setattr(repkern, "build_info", lambda: {"git_sha": "unknown", "cuda": False})
    assert timing.build_sha() == ("unknown", "build")
    monkeypatch.setattr(repkern, "build_info", lambda: {"cuda": False})  # older builds: today's fallback
    monkeypatch.setattr(timing, "git_sha", lambda: "fedcba9")
    assert timing.build_sha()[0] == "fedcba9" and timing.build_sha()[1].startswith("working directory")


def test_slow_cpu_matmuls_stay_small(monkeypatch):
    sizes = []

    def matmul_ms(m, device, dtype, options):
        sizes.append((m, dtype, options["max_repeats"]))
        return 2 * m**3 / 1e6  # 1 GFLOP/s: a CPU without bfloat16 instructions
    monkeypatch.setattr(timing, "_matmul_ms", matmul_ms)
    assert timing.measure_matmul(torch.device("cpu"), torch.bfloat16) == (1.0, 512)
    assert sizes == [(512, torch.bfloat16, 3)]


class _Props:
    def __init__(self, l2=None):
        self.major, self.minor, self.total_memory, self.multi_processor_count = 9, 0, 80 << 30, 132
        if l2 is not None:
            self.L2_cache_size = l2


def test_gpu_header(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake H100")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props(50 << 20))
    monkeypatch.setattr(bench, "driver_version", lambda: "570.86.15")
    env = bench.environment(torch.device("cuda", 0))
    assert env["device"] == "cuda:0" and env["device_name"] == "Fake H100" and env["driver"] == "570.86.15"
    assert env["device_properties"] == {"compute_capability": "9.0", "total_memory_bytes": 80 << 30,
                                        "multi_processor_count": 132, "L2_cache_size": 50 << 20}
    assert env["l2_flush_bytes"] == 100 << 20 and env["cuda_runtime"] == (torch.version.cuda or "")
    assert env["cpu_model"] == timing.cpu_model() and env["threads"] == torch.get_num_threads()
    assert "cuda_matmul_allow_tf32" in env and env["float32_matmul_precision"] == torch.get_float32_matmul_precision()


@pytest.mark.parametrize("text, version", [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n", "535.104.05"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16)\n",
     "570.86.15"),
    ("something else", ""),
])
def test_driver_version_from_proc(text, version):
    assert timing.parse_nvidia_proc_version(text) == version


def test_cpu_ceilings_measure_each_dtype_briefly():
    ceilings = timing.measure_ceilings(torch.device("cpu"), quick=True, dtypes=[torch.bfloat16, torch.float32])
    assert list(ceilings.matmul_gflops) == ["float32", "bfloat16"]
    assert ceilings.matmul_size["float32"] == 1024 and ceilings.matmul_size["bfloat16"] in (512, 1024)
    size = ceilings.matmul_size["bfloat16"]
    assert any(note.startswith(f"bfloat16 matmul measured on a {size}² product") for note in ceilings.notes)
    assert ceilings.matmul(torch.bfloat16) == ceilings.matmul_gflops["bfloat16"] and ceilings.matmul("float16") is None


# ---- --compare -------------------------------------------------------------------------------


def _row(op, provider, ms, *, dtype="float32", status="ok", **extra):
    row = dict.fromkeys(bench.CSV_FIELDS, "")
    row.update(op=op, provider=provider, shape="n=8", dtype=dtype, device="cuda:0", status=status,
               median_ms=ms, suite="gram", torch="2.13.0", git_sha="abc", **extra)
    return row


def _runs(tmp_path):
    a = [_row("gram[rbf]", "repkern", 2.0, gflops=50.0, matmul_fraction=0.25),
         _row("gram[rbf]", "reference", 4.0),
         _row("epilogue", "repkern", 1.0, gbps=3.0, copy_fraction=0.5),
         _row("gram[rbf]", "repkern", 8.0, dtype="bfloat16", matmul_fraction=0.1),
         _row("only_a", "repkern", 1.5)]
    b = [_row("gram[rbf]", "repkern", 1.0, gflops=100.0, matmul_fraction=0.5),
         _row("gram[rbf]", "reference", "", status=bench.SKIPPED_OOM, note="CUDA out of memory"),
         _row("epilogue", "repkern", 2.0, gbps=1.5, copy_fraction=0.25),
         _row("gram[rbf]", "repkern", 4.0, dtype="bfloat16", matmul_fraction=0.2),
         _row("only_b", "reference", 3.0)]
    path_a, path_b = tmp_path / "a.csv", tmp_path / "b.json"
    bench.write_csv(a, path_a)
    bench.write_json(b, {"device_name": "GPU B", "driver": "570.1", "torch": "2.13.0", "git_sha": "def"}, path_b)
    return str(path_a), str(path_b)


def test_compare_prints_ratios_and_rows_in_one_run_only(tmp_path, capsys):
    path_a, path_b = _runs(tmp_path)
    assert main(["bench", "--compare", path_a, path_b]) == 0
    out = capsys.readouterr().out
    assert f"B: {path_b}: GPU B (driver 570.1), torch 2.13.0, commit def" in out
    assert "| gram[rbf] | repkern | n=8 | float32 | 2.000 | 1.000 | 0.500 | 25% of float32 matmul | " \
           "50% of float32 matmul |" in out
    assert "| gram[rbf] | repkern | n=8 | bfloat16 | 8.000 | 4.000 | 0.500 | 10% of bfloat16 matmul | " \
           "20% of bfloat16 matmul |" in out
    assert "| gram[rbf] | reference | n=8 | float32 | 4.000 | skipped (out of memory) | – | – | – |" in out
    assert "| epilogue | repkern | n=8 | float32 | 1.000 | 2.000 | 2.000 | 50% of copy | 25% of copy |" in out
    assert f"Only in A ({path_a}): 1 row:\n" in out and "| only_a | repkern | n=8 | float32 | 1.500 | – |" in out
    assert f"Only in B ({path_b}): 1 row:\n" in out and "| only_b | reference | n=8 | float32 | 3.000 | – |" in out
    assert out.count("| only_") == 2  # not also in the side-by-side table


def test_compare_reads_results_without_the_new_columns(tmp_path, capsys):
    old = tmp_path / "old.csv"
    old.write_text("op,provider,shape,dtype,device,median_ms,matmul_fraction,suite\n"
                   "gram[rbf],repkern,n=8,float32,cpu (2 threads),3.0,0.2,gram\n")
    path_a, _ = _runs(tmp_path)
    assert main(["bench", "--compare", str(old), path_a]) == 0
    out = capsys.readouterr().out
    assert "| gram[rbf] | repkern | n=8 | float32 | 3.000 | 2.000 | 0.667 | 20% of float32 matmul |" in out
    assert f"A: {old}: cpu (2 threads)\nB: {path_a}: cuda:0, torch 2.13.0, commit abc\n" in out


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("a,b\n1,2\n", "not a repkern bench result (no column op, provider, shape, dtype, median_ms"),
    ('{"rows": []}', "not a repkern bench result (a JSON file"),
    ("{not json", "not a repkern bench result (invalid JSON"),
    (b"\xff\xfe\x00binary", "cannot read it as text"),
])
def test_compare_rejects_missing_and_foreign_files(tmp_path, capsys, content, message):
    good, _ = _runs(tmp_path)
    bad = tmp_path / "bad.csv"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    elif content is not None:
        bad.write_text(content)
    assert main(["bench", "--compare", good, str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"repkern bench: {bad}: {message}")
    assert "Traceback" not in captured.err and captured.out == ""


# ---- GPU case lists: listed, never built -------------------------------------------------------


class _CountAllocations(TorchFunctionMode):
    """Bytes of every tensor storage a torch function returns."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.bytes += out.untyped_storage().nbytes()
        return out


def _list(suite, device, quick, dtypes=None, **options):
    module = importlib.import_module(f"repkern.bench.{suite}")
    with _CountAllocations() as counter:
        cases = module.cases(torch.device(device), quick, dtypes, **options)
    assert counter.bytes <= 64, f"{suite}: listing cases allocated {counter.bytes} bytes"
    return {(c.op, c.shape, str(c.dtype).replace("torch.", "")) for c in cases}, cases


GPU_SHAPES = {
    "gram": ("gram[rbf]", "B=1 n=32768 d=4096", "bfloat16"),
    "sparsity": ("sparsity[full]", "1048576x4096", "bfloat16"),
    "sae": ("sae_encode[topk->sparse]", "N=65536 d_in=4096 d_sae=131072 k=64", "float32"),
    "cka": ("cka[rbf tiled median=sampled]", "n=65536 d=1024", "float32"),
    "streaming": ("StreamingCKA[linear]", "4+4 layers N=262144 d=1024 b=16384", "float32"),
    "cka_test": ("cka_test[linear 1000 permutations]", "n=16384 d=256/128", "float32"),
    "shape": ("StreamingAlignment[shape_distance alpha=0.5]", "N=1000000 d=1024/768 b=16384", "float32"),
    "cca": ("cca", "n=32768 d=1024/768", "float32"),
    "rsa": ("rdm[correlation]", "n=4096 d=4096", "float32"),
    "knn": ("knn[cosine]", "n=65536 d=4096 k=10", "float32"),
}


@pytest.mark.parametrize("suite", bench.SUITES)
def test_gpu_cases_are_gpu_sized_and_listing_allocates_nothing(suite, monkeypatch):
    built = []
    original = Case.make
    monkeypatch.setattr(Case, "make", lambda self: built.append(self) or original(self))
    gpu, cases = _list(suite, "cuda", False)
    cpu, _ = _list(suite, "cpu", False)
    assert GPU_SHAPES[suite] in gpu and GPU_SHAPES[suite] not in cpu
    assert not built and all(callable(c.build) and c.providers for c in cases)


def test_gpu_case_lists_follow_dtypes_and_options():
    sae, _ = _list("sae", "cuda", False, [torch.bfloat16])
    assert ("sae_encode[topk->sparse]", "N=65536 d_in=4096 d_sae=131072 k=64", "bfloat16") in sae
    assert {dtype for *_, dtype in sae} == {"bfloat16"}
    gram, _ = _list("gram", "cuda", False, [torch.float16, torch.float64])
    assert {dtype for *_, dtype in gram} == {"float16", "float64"}  # the float32-only epilogue left out
    assert not any(op.startswith("gram_epilogue") for op, *_ in gram)
    cka, _ = _list("cka", "cuda", False, full=True)
    assert ("cka[rbf tiled median=sampled]", "n=131072 d=1024", "float32") in cka
    defaults, _ = _list("sparsity", "cuda", False)
    assert {("sparsity[full]", "1048576x4096", "float32"), ("sparsity[full]", "1048576x4096", "bfloat16"),
            ("sparsity[one-read]", "262144x4096", "float32")} <= defaults


# ---- L2 flush between timed CUDA runs ---------------------------------------------------------


class _FakeEvent:
    log: list = []

    def __init__(self, enable_timing=False):
        assert enable_timing

    def record(self, stream=None):
        self.log.append("record")

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return 1.5


def test_l2_flushed_before_every_timed_cuda_run(monkeypatch):
    log = []
    _FakeEvent.log = log
    monkeypatch.setattr(timing, "_sync", lambda device: log.append("sync"))
    monkeypatch.setattr(timing, "l2_flusher", lambda device: (lambda: log.append("flush")))
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    times = timing.time_ms(lambda: log.append("fn"), torch.device("cuda", 0), warmup=2, min_repeats=3,
                           max_repeats=3, min_time_s=0.0)
    assert times == [1.5] * 3
    assert log == ["fn", "fn", "sync"] + ["flush", "record", "fn", "record"] * 3


def test_cpu_timing_is_not_flushed(monkeypatch):
    assert timing.l2_flusher(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: pytest.fail("CUDA events on the CPU"))
    calls = []
    assert len(timing.time_ms(lambda: calls.append(1), torch.device("cpu"), warmup=0, min_repeats=2,
                              max_repeats=2, min_time_s=0.0)) == 2 and len(calls) == 2


@pytest.mark.parametrize("l2, expected", [(50 << 20, 100 << 20), (0, 256 << 20), (None, 256 << 20)])
def test_l2_flush_size(monkeypatch, l2, expected):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props(l2))
    assert timing.l2_flush_bytes(torch.device("cuda", 0)) == expected


def test_l2_flusher_writes_a_buffer_of_that_size(monkeypatch):
    monkeypatch.setattr(timing, "l2_flush_bytes", lambda device: 4096)
    monkeypatch.setattr(timing, "_flush_buffers", {})
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **k: real_empty(*a, **k))  # "cuda" memory on the CPU
    flush = timing.l2_flusher(torch.device("cuda", 0))
    (buffer,) = timing._flush_buffers.values()
    assert buffer.numel() * buffer.element_size() == 4096
    buffer.fill_(7)
    flush()
    assert int(buffer.count_nonzero()) == 0
    assert timing.l2_flusher(torch.device("cuda", 0)).__self__ is buffer  # allocated once


# ---- out of memory: a skipped row, not a crash ---------------------------------------------------

FAST = {"warmup": 0, "min_repeats": 1, "max_repeats": 1, "min_time_s": 0.0}
ENV = {"device_name": "test cpu", "driver": "", "torch": torch.__version__, "cuda_runtime": "", "git_sha": "abc"}
CEILINGS = Ceilings(copy_gbps=10.0, read_gbps=20.0, matmul_gflops={"float32": 100.0})


def _raise(exc):
    def fn():
        raise exc
    return fn


def test_out_of_memory_becomes_skipped_rows(monkeypatch):
    released = []
    monkeypatch.setattr(bench, "_release", lambda device: released.append(device))
    cases = [
        Case("huge", "n=1", torch.float32, ("repkern", "reference"),
             build=_raise(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")),
             flops=1e6, timing=FAST),
        Case("ref_too_big", "n=2", torch.float32,
             {"repkern": lambda: None, "reference": _raise(RuntimeError("CUDA error: out of memory"))},
             flops=1e6, timing=FAST),
        Case("fits", "n=3", torch.float32, {"repkern": lambda: None, "reference": lambda: None}, timing=FAST),
    ]
    lines = []
    rows = bench.run_cases(cases, torch.device("cpu"), CEILINGS, env=ENV, log=lines.append)
    got = [(r["op"], r["provider"], r["status"]) for r in rows]
    assert got == [("huge", "repkern", bench.SKIPPED_OOM), ("huge", "reference", bench.SKIPPED_OOM),
                   ("ref_too_big", "repkern", "ok"), ("ref_too_big", "reference", bench.SKIPPED_OOM),
                   ("fits", "repkern", "ok"), ("fits", "reference", "ok")]
    huge, _, ok, skipped_ref, *_ = rows
    assert huge["note"] == "CUDA out of memory. Tried to allocate 64.00 GiB" and huge["median_ms"] == ""
    assert huge["matmul_ceiling_gflops"] == 100.0 and huge["gflops"] == ""
    assert skipped_ref["note"] == "CUDA error: out of memory" and ok["speedup_vs_reference"] == ""
    assert isinstance(ok["median_ms"], float) and ok["gflops"] != ""
    assert rows[-2]["speedup_vs_reference"] != ""
    assert lines[0].split()[:4] == ["huge", "repkern", "n=1", "float32"]
    assert lines[0].endswith("skipped (out of memory): CUDA out of memory. Tried to allocate 64.00 GiB")
    assert len(released) == 4  # after the failed build, the failed provider and each case that ran
    table = report.tables([{**r, "suite": "s"} for r in rows])
    assert "| huge | repkern | n=1 | float32 | skipped (out of memory) | skipped (out of memory) |" in table
    assert "| ref_too_big | repkern | n=2 | float32 |" in table and " | skipped (out of memory) | – |" in table


def test_rows_are_compared_with_the_matmul_of_their_own_dtype():
    ceilings = Ceilings(copy_gbps=10.0, read_gbps=20.0, matmul_gflops={"float32": 100.0, "bfloat16": 400.0})
    cases = [Case("mm", "n=1", dtype, {"repkern": lambda: None}, flops=1e6, timing=FAST)
             for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    rows = bench.run_cases(cases, torch.device("cpu"), ceilings, env=ENV, log=lambda line: None)
    assert [r["matmul_ceiling_gflops"] for r in rows] == [100.0, 400.0, ""]
    for r, ceiling in zip(rows, (100.0, 400.0)):
        assert r["matmul_fraction"] == pytest.approx(r["gflops"] / ceiling, rel=0.05, abs=1e-3)
    assert rows[2]["gflops"] != "" and rows[2]["matmul_fraction"] == ""  # no float16 ceiling measured


@pytest.mark.parametrize("exc", [torch.cuda.OutOfMemoryError("x"), MemoryError(), RuntimeError("CUDA out of memory."),
                                 RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1")])
def test_out_of_memory_errors(exc):
    assert timing.is_out_of_memory(exc)


def test_other_errors_are_not_swallowed():
    assert not timing.is_out_of_memory(RuntimeError("shape mismatch")) and not timing.is_out_of_memory(ValueError())
    case = Case("bug", "n=1", torch.float32, ("repkern",), build=_raise(ValueError("a bug")), timing=FAST)
    with pytest.raises(ValueError, match="a bug"):
        bench.run_cases([case], torch.device("cpu"), CEILINGS, env=ENV, log=lambda line: None)


def test_build_must_return_the_declared_providers():
    case = Case("op", "n=1", torch.float32, ("repkern", "reference"), build=lambda: {"repkern": lambda: None})
    with pytest.raises(ValueError, match="declared"):
        bench.run_cases([case], torch.device("cpu"), CEILINGS, env=ENV, log=lambda line: None)


# ---- options and output paths ------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--dtype", "float8"], ["--dtype", "int32"], ["--device", "tpu"],
                                  ["--device", "cuda:x"], ["--compare", "only-one.csv"]])
def test_bad_options_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", *argv])
    assert info.value.code == 2 and "error:" in capsys.readouterr().err


def _fake_run(monkeypatch):
    """bench.run_suites replaced: records what the command passed, returns one row."""
    seen = {}

    def run_suites(case_lists, device, *, quick, dtypes, **kwargs):
        seen.update(case_lists=case_lists, device=device, quick=quick, dtypes=dtypes)
        rows = bench.Results([{**_row("op", "repkern", 1.0, peak_mem_bytes=0), "suite": "gram"}])
        rows.header = {"device": str(device)}
        return rows

    monkeypatch.setattr(bench, "run_suites", run_suites)
    monkeypatch.setattr(report, "plot", lambda rows, path: path)
    return seen


def test_device_and_dtypes_reach_the_suites(tmp_path, monkeypatch, capsys):
    seen = _fake_run(monkeypatch)
    path = tmp_path / "r.csv"
    argv = ["bench", "--op", "gram", "--op", "sae", "--device", "cpu", "--dtype", "float64", "--dtype", "float16",
            "--dtype", "float64", "--csv", str(path)]
    assert main(argv) == 0
    assert seen["device"] == torch.device("cpu") and seen["dtypes"] == [torch.float64, torch.float16]
    assert list(seen["case_lists"]) == ["gram", "sae"]
    dtypes = {c.dtype for cases in seen["case_lists"].values() for c in cases}
    assert dtypes == {torch.float64, torch.float16}
    assert path.exists() and path.with_suffix(".json").exists()


def test_run_passes_device_and_dtypes(monkeypatch):
    seen = _fake_run(monkeypatch)
    bench.run(["sparsity"], device="cpu", quick=True, dtypes=[torch.bfloat16])
    (cases,) = seen["case_lists"].values()
    assert seen["dtypes"] == [torch.bfloat16] and {c.dtype for c in cases} == {torch.bfloat16}
    assert {c.shape for c in cases} == {"2048x512", "4096x1024"}


def test_unwritable_csv_is_a_clear_error_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run_suites", lambda *a, **k: pytest.fail("ran although the CSV cannot be written"))
    (tmp_path / "a-file").write_text("x")
    for target in (tmp_path / "a-file" / "out.csv", tmp_path):
        assert main(["bench", "--op", "gram", "--quick", "--device", "cpu", "--csv", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"repkern bench: cannot write results to {target}") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing left behind


def test_write_failure_after_the_run_is_a_clear_error(tmp_path, monkeypatch, capsys):
    _fake_run(monkeypatch)

    def fail(rows, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(bench, "write_csv", fail)
    path = tmp_path / "r.csv"
    assert main(["bench", "--op", "gram", "--quick", "--device", "cpu", "--csv", str(path)]) == 2
    assert capsys.readouterr().err == f"repkern bench: cannot write results to {path}: Permission denied\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--device", "cuda", "--csv", str(tmp_path / "r.csv")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_full_adds_the_largest_cases(monkeypatch, tmp_path):
    seen = _fake_run(monkeypatch)
    assert main(["bench", "--op", "cka", "--device", "cpu", "--full", "--csv", str(tmp_path / "c.csv")]) == 0
    assert ("cka[rbf tiled median=sampled]", "n=32768 d=768") in {(c.op, c.shape) for c in seen["case_lists"]["cka"]}
