"""`repkern selftest` and repkern.selftest.run: it passes on this machine (CPU kernels and, under
REPKERN_BACKEND=emu, the CUDA kernels through the emulator), it catches a planted wrong op and turns an
exception inside a case into a FAIL row, and `--device cuda` without a GPU is a clear error (exit 2).
Everything runs in --quick mode."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

import repkern
from repkern import reference, selftest
from repkern.__main__ import main
from repkern._validation.similarity import SIMILARITY_METRICS
from repkern.ops import cca as cca_ops
from repkern.ops import gram as gram_ops
from repkern.ops import knn as knn_ops
from repkern.ops import rsa as rsa_ops
from repkern.ops import sae as sae_ops
from repkern.ops import shape as shape_ops
from repkern.ops import similarity as similarity_ops
from repkern.ops.streaming_alignment import StreamingAlignment

ALIGNMENT_OPS = {"knn", "mutual_knn", "cycle_knn", "cknna", "shape_distance", "cca", "svcca", "pwcca", "rdm", "rsa",
                 "similarity_matrix", "similarity_test", "StreamingAlignment"}
# public names with no numbers of their own to check: result types, the capture and workflow layer (its
# numbers are the ops'), cka's memory plan, metadata
NOT_OPS = {"CkaPlan", "CkaTestResult", "SparsityStats", "SparseCodes", "CsrCodes", "CkaResult", "SparsityProfile",
           "Neighbors", "SimilarityTestResult", "AlignmentResult", "PerturbationResult", "capture", "compare_models", "profile_sparsity",
           "perturbation_sensitivity", "load_result",
           "cka_plan", "build_info", "reference", "__version__"}


def _only(ops):
    """The case list restricted to these ops (for the CLI, which always runs the whole list)."""
    every = selftest.cases
    return lambda: [c for c in every() if c.op in ops]


def test_cli_quick_on_cpu_passes_and_prints_the_table(capsys, monkeypatch):
    monkeypatch.delenv("REPKERN_BACKEND", raising=False)
    assert main(["selftest", "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("op "))
    assert header.split() == ["op", "variant", "dtype", "device", "backend", "max", "error", "tolerance", "worst",
                              "output", "status"]
    table = [line for line in out.splitlines() if line.endswith(("PASS", "FAIL"))]
    assert table and all(line.endswith("PASS") for line in table)
    ops = {line.split("  ")[0].strip() for line in table}
    assert {"gram", "hsic", "cka", "cka_matrix", "StreamingCKA", "MinibatchCKA", "cka_test", "sparsity_stats",
            "SparsityAccumulator", "sae_encode", "sae_decode", "SAE", "gram backward", "cka backward",
            "sae_encode backward", "sae_decode backward"} | ALIGNMENT_OPS <= ops
    assert all(f" {dtype} " in out for dtype in ("float32", "float64", "bfloat16"))
    assert re.search(r"^\d+ checks, \d+ passed, all passed \(", out.splitlines()[-1])


def test_cli_quick_under_the_emulator_runs_the_cuda_kernels(capsys, monkeypatch):
    monkeypatch.setenv("REPKERN_BACKEND", "emu")
    assert main(["selftest", "--quick", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert rows and result["failed"] == 0 and result["passed"] == len(rows)
    assert {r["backend"] for r in rows} == {"emu"} and {r["device"] for r in rows} == {"cpu"}
    assert all(r["status"] == "PASS" and r["max_error"] <= r["tolerance"] for r in rows)
    assert {"knn", "mutual_knn", "cycle_knn", "cknna"} <= {r["op"] for r in rows}  # the native kNN merge


def test_planted_wrong_gram_is_caught(capsys, monkeypatch):
    """gram off by 1e-3: every float32/float64 gram row fails (bfloat16/float16 may round 1e-3 away
    on large entries), the other ops still pass, and the command exits non-zero."""
    monkeypatch.delenv("REPKERN_BACKEND", raising=False)
    honest = gram_ops.gram
    monkeypatch.setattr(gram_ops, "gram", lambda *args, **kw: honest(*args, **kw) + 1e-3)
    rows = selftest.run("cpu", quick=True, ops=["gram", "cka"])
    gram_rows = [r for r in rows if r.op == "gram"]
    assert gram_rows and all(r.status == "FAIL" for r in gram_rows if r.dtype in ("float32", "float64"))
    for r in gram_rows:
        if r.status == "FAIL":
            assert r.field == "K" and r.max_error > r.tolerance and "error" in r.message
    assert all(r.passed for r in rows if r.op == "cka"), "cka does not go through the public gram"

    monkeypatch.setattr(selftest, "cases", _only({"gram"}))
    assert main(["selftest", "--quick", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "failures:" in out and "FAILED" in out.splitlines()[-1]


def test_planted_wrong_knn_neighbours_are_caught(monkeypatch):
    """knn with its first two neighbours swapped (values right): every knn row fails on its indices, and
    mutual_knn / cycle_knn, which see neighbour sets only, still pass."""
    honest = knn_ops.knn

    def swapped(*args, **kw):
        out = honest(*args, **kw)
        return out._replace(indices=out.indices[:, [1, 0, *range(2, out.indices.shape[1])]])

    monkeypatch.setattr(knn_ops, "knn", swapped)
    rows = selftest.run("cpu", quick=True, ops=["knn", "mutual_knn", "cycle_knn"])
    knn_rows = [r for r in rows if r.op == "knn"]
    assert knn_rows and all(r.status == "FAIL" and r.field == "indices" for r in knn_rows)
    assert all(r.passed for r in rows if r.op != "knn")


def test_a_tile_merge_that_drops_the_column_side_fails_the_tiled_knn_cases(monkeypatch):
    """The native merge of an off-diagonal tile also feeds the rows of the later block (the transposed
    tile); without that, rows of later blocks miss earlier candidates: the cases with several tiles fail,
    the single-tile one passes."""
    honest = knn_ops._merge_native

    def rows_only(tile, col_bias, row_bias, vals, idx, col_vals, col_idx, i0, j0):
        honest(tile, col_bias, None, vals, idx, None, None, i0, j0)

    monkeypatch.setattr(knn_ops, "_merge_native", rows_only)
    rows = selftest.run("cpu", quick=True, ops=["knn"])
    assert {r.variant for r in rows} == {"cosine", "euclidean shifted tiles"}
    assert all(r.status == ("FAIL" if "tiles" in r.variant else "PASS") for r in rows)


@pytest.mark.parametrize("module, name, ops", [
    (shape_ops, "shape_distance", ["shape_distance"]),
    (cca_ops, "cca", ["cca"]),
    (cca_ops, "svcca", ["svcca"]),
    (cca_ops, "pwcca", ["pwcca"]),
    (rsa_ops, "rdm", ["rdm"]),
    (rsa_ops, "rsa", ["rsa"]),
    (knn_ops, "cknna", ["cknna"]),
    (similarity_ops, "similarity_matrix", ["similarity_matrix"]),
    (StreamingAlignment, "compute", ["StreamingAlignment"]),
])
def test_planted_wrong_alignment_results_are_caught(monkeypatch, module, name, ops):
    """An alignment result off by 1e-3 (far above 2e-5 relative to these outputs of order 1) fails every
    quick row of its op, in every dtype: the outputs are float32 or float64 statistics."""
    honest = getattr(module, name)

    def shifted(*args, **kw):
        out = honest(*args, **kw)
        return [[t + 1e-3 for t in row] for row in out] if isinstance(out, list) else out + 1e-3

    monkeypatch.setattr(module, name, shifted)
    rows = selftest.run("cpu", quick=True, ops=ops)
    assert rows and all(r.status == "FAIL" and r.max_error > r.tolerance for r in rows)


def test_a_planted_wrong_similarity_test_p_value_is_caught(monkeypatch):
    honest = similarity_ops.similarity_test

    def off_by_one(*args, **kw):
        res = honest(*args, **kw)
        step = 1.0 / (1 + res.null.numel())
        return dataclasses.replace(res, p_value=res.p_value + step)

    monkeypatch.setattr(similarity_ops, "similarity_test", off_by_one)
    rows = selftest.run("cpu", quick=True, ops=["similarity_test"])
    assert rows and all(r.status == "FAIL" and r.field == "p_value" for r in rows)


def test_an_op_that_writes_into_its_input_fails(monkeypatch):
    honest = gram_ops.gram

    def scribbling(x, *args, **kw):
        out = honest(x, *args, **kw)
        x.mul_(2)  # right result, but the caller's tensor is changed
        return out

    monkeypatch.setattr(gram_ops, "gram", scribbling)
    rows = selftest.run("cpu", quick=True, ops=["gram"])
    assert rows and all(r.status == "FAIL" and "modified its input" in r.message for r in rows)


def test_a_planted_low_precision_error_fails_the_16_bit_rule(monkeypatch):
    """The float16/bfloat16 rule (at most 2x the reference's own error in that precision): a result that
    is right in float32 but rounded badly (to a coarse grid) fails, the honest one passes."""

    def build(g, quick):
        return {"x": torch.randn(20, 8, generator=g, dtype=torch.float64)}

    def coarse(x):
        k = reference.gram(x.float(), "cosine")
        return {"K": ((k * 16).round() / 16).to(x.dtype)}  # 2^-4 steps: coarser than float16 and bfloat16

    fine = selftest.Case("synthetic", "honest", build, lambda x: {"K": reference.gram(x, "cosine")},
                         lambda x: {"K": reference.gram(x, "cosine")})
    bad = selftest.Case("synthetic", "coarse", build, coarse, lambda x: {"K": reference.gram(x, "cosine")})
    monkeypatch.setattr(selftest, "cases", lambda: [fine, bad])
    rows = {(r.variant, r.dtype): r for r in selftest.run("cpu")}
    assert all(r.passed for (variant, _), r in rows.items() if variant == "honest")
    for dtype in ("float32", "float16", "bfloat16", "float64"):
        assert rows["coarse", dtype].status == "FAIL", dtype


def test_an_exception_in_a_case_is_a_fail_row_not_a_crash(capsys, monkeypatch):
    monkeypatch.delenv("REPKERN_BACKEND", raising=False)

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure in sae_decode")

    monkeypatch.setattr(sae_ops, "sae_decode", broken)
    rows = selftest.run("cpu", quick=True, ops=["sae_decode", "sae_decode backward", "sae_encode backward"])
    decode = [r for r in rows if r.op.startswith("sae_decode")]
    assert decode and all(r.status == "FAIL" for r in decode)
    assert all("RuntimeError: planted failure in sae_decode" in r.message for r in decode)
    later = [r for r in rows if r.op == "sae_encode backward"]
    assert later and all(r.passed for r in later), "the run went on after the failing cases"
    assert rows.index(decode[0]) < rows.index(later[0])

    monkeypatch.setattr(selftest, "cases", _only({"sae_decode"}))
    assert main(["selftest", "--quick", "--device", "cpu", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["failed"] == len(result["rows"]) > 0
    assert result["rows"][0]["max_error"] is None  # NaN (never compared) is null in JSON


def test_device_cuda_without_a_gpu_exits_2_naming_the_reason(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["selftest", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "no CUDA GPU is visible" in err
    if not repkern.build_info()["cuda"]:
        assert "built without CUDA kernels" in err
    with pytest.raises(selftest.DeviceUnavailable, match="no CUDA GPU"):
        selftest.run("cuda", quick=True)
    assert selftest.devices_for("all") == ["cpu"]  # all = cpu, plus cuda only when it can run


def test_device_all_adds_cuda_only_when_it_can_run():
    can = torch.cuda.is_available() and repkern.build_info()["cuda"]
    assert selftest.devices_for("all") == (["cpu", "cuda"] if can else ["cpu"])
    with pytest.raises(ValueError, match="device"):
        selftest.devices_for("tpu")
    with pytest.raises(ValueError, match="unknown op"):
        selftest.run("cpu", ops=["no_such_op"])


def test_case_list_covers_every_op_and_quick_is_a_subset():
    all_cases = selftest.cases()
    names = [c.name for c in all_cases]
    assert len(names) == len(set(names)), "case names are unique (they seed the inputs)"
    quick = {c.op for c in all_cases if c.quick}
    assert quick == {c.op for c in all_cases} - {"cka_matrix backward", "hsic backward"}
    variants = {c.name for c in all_cases}
    for activation in ("relu", "topk", "jumprelu", "batchtopk"):
        assert any(v.startswith(f"sae_encode[{activation}") and "sparse" in v for v in variants), activation
        assert any(v.startswith(f"sae_encode[{activation}") and "dense" in v for v in variants), activation
    for method in ("feature", "gram", "tiled"):
        assert any(v.startswith("cka[") and method in v for v in variants), method
        assert any(v.startswith("cka backward[") and method in v for v in variants), method
    for metric in ("cosine", "ip", "euclidean"):
        assert any(v.startswith("knn[") and metric in v for v in variants), metric
    assert any(v.startswith("knn[") and "tiles" in v for v in variants), "off-diagonal tiles of the kNN merge"
    for metric in SIMILARITY_METRICS:
        for op in ("similarity_matrix", "similarity_test"):
            assert any(re.match(rf"{op}\[{metric}[ \]]", v) for v in variants), (op, metric)


def test_every_public_op_has_a_selftest_case():
    """A public op added to repkern.__all__ without a selftest case (or a stale NOT_OPS entry) fails."""
    ops = {c.op for c in selftest.cases()}
    public = set(repkern.__all__)
    assert not public - NOT_OPS - ops, "public ops without a selftest case"
    assert NOT_OPS <= public and not NOT_OPS & ops
