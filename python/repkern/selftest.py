"""``repkern selftest``: every public op on a device against :mod:`repkern.reference`.

What a user runs on a new GPU (or a new build) before trusting its numbers: each case
builds a small input, runs the op on the device (the fast path: the CPU kernels, the CUDA
kernels, or the CUDA kernels through the emulator under ``REPKERN_BACKEND=emu``), runs the
plain-PyTorch twin on the CPU, and compares. One loop runs the case list; an exception in a
case is a FAIL row carrying its message, never the end of the run.

Tolerances (by the dtype of each output; the reference runs on the same input values, once
in the input's precision and once upcast to float64):

- float64 outputs: ``max |fast − ref64| <= 1e-10 · max |ref64|``;
- float32 outputs (also the float32 statistics of 16-bit inputs): ``<= 2e-5 · max |ref64|``
  (1e-4 for float32 gradients of RBF CKA/HSIC with the median bandwidth: MEDIAN_GRADIENT_TOLERANCE);
- float16/bfloat16 outputs: at most 2× the error of the reference run in the same precision,
  both against the float64 reference, plus one unit of the format's epsilon (times
  ``max |ref64|``) — the rule of the tests' ``assert_close_to_reference``, normwise;
- integer and boolean outputs (indices, counts, histograms): equal, except that histogram
  bins may differ by one count for non-float64 input (a statistic on a bin edge);
- kNN neighbour indices, ties allowed: valid (another row, once per row), and the float64
  reference similarity of the neighbour listed at each rank within the float tolerance of the
  reference's value at that rank;
- NaN must appear exactly where the float64 reference has NaN.

Errors are reported relative to ``max |ref64|`` of the output (1 where that is 0), so the
"max error" column of the table is a relative, normwise error; the row shows the output
with the worst error/tolerance ratio. Ops are looked up in their modules
(``repkern.ops.gram.gram``, ...) at each call, so a patched op is what runs.

Python: :func:`run` returns the :class:`Result` rows, :func:`format_table` /
:func:`to_json` render them, :func:`main` is the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import traceback
import warnings
import zlib
from typing import Callable, Optional, Sequence

import torch

from repkern import _C, _native, reference
from repkern.reference.knn import similarities
from repkern.results import sparsity as sr
from repkern.results.sae import CsrCodes, SparseCodes

__all__ = ["Result", "Case", "DeviceUnavailable", "cases", "run", "devices_for", "format_table", "to_json", "main"]

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
ALL_DTYPES = (F32, F64, F16, BF16)
FULL_PRECISION = (F32, F64)
QUICK_DTYPES = (F32, F64, BF16)
RELATIVE_TOLERANCE = {F64: 1e-10, F32: 2e-5}
HISTOGRAM_SLACK = 1  # bins may differ by one count for non-float64 input (a statistic on a bin edge)
SMALL_CHUNKS = 4096  # sae_encode chunk_bytes of the "chunked" cases: many column chunks and row blocks
# float32 gradients of RBF CKA/HSIC with the median bandwidth (repkern::hsic_terms_backward plus the
# median's gradient) are 10-40x less accurate than the float32 reference's autograd (normwise ~1e-5 at
# n = 64, ~1e-4 at n = 800; with a given sigma they match it): a wider bound for those cases.
MEDIAN_GRADIENT_TOLERANCE = {F32: 1e-4}


class DeviceUnavailable(RuntimeError):
    """The requested device cannot run repkern's kernels here (no GPU, or a build without CUDA)."""


class Mismatch(AssertionError):
    """A fast output violates a fact that needs no reference (raised inside a case: a FAIL row)."""


@dataclasses.dataclass
class Result:
    """One row of the table: a case run in one dtype on one device.

    max_error / tolerance: of the output with the worst error/tolerance ratio (``field``),
    relative to the largest magnitude of its float64 reference (for integer outputs: the
    largest absolute difference); NaN when the case did not get as far as comparing."""

    op: str
    variant: str
    dtype: str
    device: str
    backend: str
    max_error: float
    tolerance: float
    status: str  # "PASS" or "FAIL"
    field: str = ""
    message: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "PASS"


@dataclasses.dataclass(frozen=True)
class Case:
    """One op/variant. ``build(g, quick)`` returns the inputs (a dict of keyword arguments:
    float64 CPU tensors, lists of them, SparseCodes/CsrCodes, or other values); the runner
    casts floating tensors to the dtype under test and moves them to the device. ``fast`` and
    ``ref`` take those keyword arguments and return ``{output name: tensor}``. ``tolerance``
    overrides RELATIVE_TOLERANCE for float32/float64 outputs; ``extra(fast, ref64, dtype)``
    adds (name, error, tolerance) checks of outputs listed in ``skip``."""

    op: str
    variant: str
    build: Callable[[torch.Generator, bool], dict]
    fast: Callable[..., dict]
    ref: Callable[..., dict]
    dtypes: tuple = ALL_DTYPES
    quick: bool = False
    tolerance: dict = dataclasses.field(default_factory=dict)
    skip: tuple = ()
    extra: Optional[Callable] = None

    @property
    def name(self) -> str:
        return f"{self.op}[{self.variant}]"


# ---- op lookup (at call time, so that a patched op is the one tested) ------------------------


def _ops(name: str):
    import importlib

    return importlib.import_module(f"repkern.ops.{name}")


def _sae_module():
    from repkern.nn import sae

    return sae


# ---- input data --------------------------------------------------------------------------------


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _rows(quick: bool) -> int:
    """Samples of the Gram/CKA cases: 24 (quick) or 64 (two 32-row CUDA epilogue tiles, a partial
    64-row strip on the CPU)."""
    return 24 if quick else 64


def _pair(g, n, d1=10, d2=6, noise=0.8, shift=0.0):
    """x (n, d1), y (n, d2) = a noisy linear map of x: CKA well inside (0, 1)."""
    x = _randn(g, n, d1)
    y = x @ _randn(g, d1, d2) / math.sqrt(d1) + noise * _randn(g, n, d2)
    return x + shift, y - shift


def _layers(g, n, widths, shift=0.0):
    """Layers of one model: noisy maps of a shared signal, offset by `shift`."""
    base = _randn(g, n, 5)
    return [base @ _randn(g, 5, w) + 0.8 * _randn(g, n, w) + shift for w in widths]


def _activations(g, *shape, zeros=0.5):
    """Activation-like data: about `zeros` of the entries exactly 0, the rest heavy-tailed."""
    x = _randn(g, *shape) * (0.1 + 4 * torch.rand(*shape, generator=g, dtype=torch.float64).pow(3))
    x[torch.rand(*shape, generator=g) < zeros] = 0
    return x


def _sae_weights(g, d_in, d_sae, bias_scale=0.3):
    W = _randn(g, d_in, d_sae) / math.sqrt(d_in)
    return dict(W_enc=W, b_enc=bias_scale * _randn(g, d_sae), b_dec=0.5 * _randn(g, d_in))


def _sae_inputs(g, quick, bias_scale=0.3):
    """x (2, rows, d_in) and weights; full size: d_sae = 301 (not a multiple of any tile)."""
    rows, d_in, d_sae = (12, 16, 80) if quick else (24, 20, 301)
    inputs = _sae_weights(g, d_in, d_sae, bias_scale)
    inputs["x"] = _randn(g, 2, rows, d_in)
    return inputs


def _thresholds(g, inputs):
    return 0.05 + 0.5 * torch.rand(inputs["b_enc"].shape[0], generator=g, dtype=torch.float64)


# ---- casting between dtypes and devices --------------------------------------------------------


def _map(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # SparseCodes, CsrCodes
        return type(obj)(*[_map(v, fn) for v in obj])
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn) for v in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _cast(obj, dtype):
    return _map(obj, lambda t: t.to(dtype) if t.is_floating_point() else t)


def _to(obj, device):
    return _map(obj, lambda t: t.to(device, copy=True))


def _tensors(obj) -> list:
    found = []
    _map(obj, found.append)
    return found


def _check_inputs_unchanged(before, after) -> None:
    """The op left its inputs alone (bit for bit; NaN where NaN was)."""
    for i, (a, b) in enumerate(zip(_tensors(before), _tensors(after))):
        b = b.cpu()
        same = a.shape == b.shape and bool(((a == b) | (a != a) & (b != b)).all())
        if not same:
            raise Mismatch(f"the op modified its input tensor #{i} {tuple(a.shape)} in place")


def _to_cpu(outputs: dict) -> dict:
    if not isinstance(outputs, dict):
        raise TypeError(f"a case must return a dict of outputs, got {type(outputs).__name__}")
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in outputs.items()}


# ---- comparison -------------------------------------------------------------------------------


def _compare_one(name, fast, low, exact, case: Case, float64_input: bool):
    """(error, tolerance, message) of one output; message non-empty on a structural mismatch."""
    if tuple(fast.shape) != tuple(exact.shape):
        return math.inf, 0.0, f"{name}: shape {tuple(fast.shape)}, reference {tuple(exact.shape)}"
    if fast.dtype != low.dtype:
        return math.inf, 0.0, f"{name}: dtype {fast.dtype}, reference {low.dtype}"
    if fast.numel() == 0:
        return 0.0, 0.0, ""
    if not fast.is_floating_point():
        if fast.dtype == torch.bool:
            err = float((fast != exact).sum())
        else:
            err = float((fast.long() - exact.long()).abs().max())
        slack = HISTOGRAM_SLACK if "histogram" in name and not float64_input else 0
        return err, float(slack), ""
    f, lo, r = fast.double(), low.double(), exact.double()
    nan_f, nan_r = torch.isnan(f), torch.isnan(r)
    if not torch.equal(nan_f, nan_r):
        return math.inf, 0.0, (f"{name}: NaN pattern differs from the reference ({int(nan_f.sum())} NaN, "
                               f"reference {int(nan_r.sum())})")
    inf_r = torch.isinf(r)
    if not torch.equal(torch.isinf(f), inf_r) or not torch.equal(f[inf_r], r[inf_r]):
        return math.inf, 0.0, f"{name}: ±Inf pattern differs from the reference"
    finite = torch.isfinite(r)
    f, lo, r = f[finite], lo[finite], r[finite]
    if r.numel() == 0:
        return 0.0, 0.0, ""
    scale = float(r.abs().max()) or 1.0
    err = float((f - r).abs().max()) / scale
    if fast.dtype in RELATIVE_TOLERANCE:
        tol = case.tolerance.get(fast.dtype, RELATIVE_TOLERANCE[fast.dtype])
    else:
        ref_err = float((lo.nan_to_num(0.0) - r).abs().max()) / scale
        tol = 2 * ref_err + torch.finfo(fast.dtype).eps
    return err, tol, ""


def _ratio(err: float, tol: float) -> float:
    if math.isnan(err):
        return math.inf
    if err <= tol:
        return err / tol if tol > 0 else 0.0
    return math.inf if tol == 0 else err / tol


def _compare(fast: dict, low: dict, exact: dict, case: Case, dtype: torch.dtype):
    """Worst output: (ratio, field, error, tolerance, messages)."""
    worst = (-1.0, "", math.nan, math.nan)
    messages = []
    for name in exact:
        if name in case.skip:
            continue
        if name not in fast:
            messages.append(f"{name}: missing from the fast op's outputs")
            worst = max(worst, (math.inf, name, math.nan, math.nan), key=lambda w: w[0])
            continue
        err, tol, msg = _compare_one(name, fast[name], low[name], exact[name], case, dtype == F64)
        if msg:
            messages.append(msg)
        ratio = _ratio(err, tol)
        if ratio > worst[0]:
            worst = (ratio, name, err, tol)
    if case.extra is not None:
        for name, err, tol in case.extra(fast, exact, dtype):
            ratio = _ratio(err, tol)
            if ratio > worst[0]:
                worst = (ratio, name, err, tol)
    ratio, field, err, tol = worst
    if ratio > 1 and not messages:
        messages.append(f"{field}: error {err:.3g} > tolerance {tol:.3g}")
    return ratio, field, err, tol, messages


# ---- the runner -------------------------------------------------------------------------------


def devices_for(device: str) -> list:
    """The devices a ``--device`` value names: ``"all"`` = cpu, plus cuda when a GPU and a CUDA
    build are present. Raises DeviceUnavailable for a CUDA device that cannot run here."""
    if device == "all":
        return ["cpu"] + (["cuda"] if not _cuda_problem() else [])
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'all', got {device!r}")
    if dev.type == "cuda":
        problem = _cuda_problem()
        if problem:
            raise DeviceUnavailable(f"--device {device}: {problem}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return [device]


def _cuda_problem() -> str:
    """Why CUDA cannot run here ('' when it can)."""
    problems = []
    if not torch.cuda.is_available():
        problems.append(f"no CUDA GPU is visible to torch (torch.cuda.is_available() is False; torch "
                        f"{torch.__version__}, CUDA runtime {torch.version.cuda or 'none: a CPU-only build'})")
    if not _C.build_info()["cuda"]:
        reason = _C.build_info()["cuda_skipped"] or "no nvcc at build time"
        problems.append(f"repkern was built without CUDA kernels ({reason}; reinstall with nvcc on PATH and "
                        "REPKERN_CUDA=ON)")
    return "; ".join(problems)


def backend_name(device) -> str:
    """Which implementation runs for tensors on `device`: 'cpu-<level>' (the CPU kernels' instruction-set
    level), 'emu', 'cuda' or 'reference'."""
    if _native.use_reference():
        return "reference"
    backend = _native.backend_for(torch.device(device))
    return f"cpu-{_C.cpu_isa()}" if backend == "cpu" else backend


def _seed(case: Case) -> int:
    return zlib.crc32(case.name.encode())


def _run_case(case: Case, dtype: torch.dtype, device: str, backend: str, quick: bool) -> Result:
    dname = str(dtype).replace("torch.", "")
    start = time.perf_counter()
    row = Result(case.op, case.variant, dname, device, backend, math.nan, math.nan, "FAIL")
    try:
        master = case.build(torch.Generator().manual_seed(_seed(case)), quick)
        low_in = _cast(master, dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast_in = _to(low_in, torch.device(device))
            fast = _to_cpu(case.fast(**fast_in))
            _check_inputs_unchanged(low_in, fast_in)
            low = _to_cpu(case.ref(**low_in))
            exact = low if dtype == F64 else _to_cpu(case.ref(**_cast(low_in, F64)))
        ratio, field, err, tol, messages = _compare(fast, low, exact, case, dtype)
        row.field, row.max_error, row.tolerance = field, err, tol
        row.status = "PASS" if ratio <= 1 and not messages else "FAIL"
        row.message = "; ".join(messages)
    except Exception as exc:  # noqa: BLE001 - any failure of a case is a FAIL row
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f" ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})" if frame else ""
        row.message = f"{type(exc).__name__}: {exc}{where}"
    row.seconds = time.perf_counter() - start
    return row


def run(device: str = "cpu", quick: bool = False, *, ops: Optional[Sequence[str]] = None,
        progress: Optional[Callable[[Result], None]] = None) -> list:
    """Runs the case list on `device` (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"all"``) and returns
    one :class:`Result` per case and dtype. ``quick``: the smallest shapes, the cases marked quick,
    dtypes float32/float64/bfloat16. ``ops``: only cases of these op names (``Case.op``).
    ``progress`` is called with each row as it is done. Raises DeviceUnavailable for a CUDA device
    without a GPU or CUDA build; never raises for a failing case."""
    selected = [c for c in cases() if (c.quick or not quick) and (ops is None or c.op in ops)]
    if ops is not None:
        unknown = set(ops) - {c.op for c in cases()}
        if unknown:
            raise ValueError(f"ops: unknown op name(s) {sorted(unknown)}; known: {sorted({c.op for c in cases()})}")
    rows = []
    for dev in devices_for(device):
        backend = backend_name(dev)
        for case in selected:
            for dtype in case.dtypes:
                if quick and dtype not in QUICK_DTYPES:
                    continue
                row = _run_case(case, dtype, dev, backend, quick)
                rows.append(row)
                if progress is not None:
                    progress(row)
    return rows


# ---- output -----------------------------------------------------------------------------------


def _number(value: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    if value == int(value) and abs(value) < 1e6 and value >= 1:
        return f"{int(value)}"
    return f"{value:.2e}"


def format_table(rows: Sequence[Result]) -> str:
    """A fixed-width table (op, variant, dtype, device, backend, max error, tolerance, output,
    status), the messages of failed rows, and a summary line."""
    header = ("op", "variant", "dtype", "device", "backend", "max error", "tolerance", "worst output", "status")
    body = [(r.op, r.variant, r.dtype, r.device, r.backend, _number(r.max_error), _number(r.tolerance), r.field,
             r.status) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    right = {5, 6}

    def line(cells):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(cells).rstrip()

    lines = [line(header), line(["-" * w for w in widths])] + [line(b) for b in body]
    failed = [r for r in rows if not r.passed]
    if failed:
        lines.append("")
        lines.append("failures:")
        lines += [f"  {r.op}[{r.variant}] {r.dtype} {r.device}: {r.message}" for r in failed]
    lines.append("")
    lines.append(summary(rows))
    return "\n".join(lines)


def summary(rows: Sequence[Result]) -> str:
    failed = sum(not r.passed for r in rows)
    seconds = sum(r.seconds for r in rows)
    verdict = "all passed" if rows and not failed else f"{failed} FAILED"
    return f"{len(rows)} checks, {len(rows) - failed} passed, {verdict} ({seconds:.1f} s)"


def to_json(rows: Sequence[Result]) -> str:
    """``{"rows": [...], "passed": n, "failed": m}``; non-finite numbers as null."""

    def clean(row):
        d = dataclasses.asdict(row)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    failed = sum(not r.passed for r in rows)
    return json.dumps({"rows": [clean(r) for r in rows], "passed": len(rows) - failed, "failed": failed}, indent=1)


def main(device: str = "cpu", quick: bool = False, as_json: bool = False) -> int:
    """The command: prints the table (or JSON); 0 if every check passed, 1 if any failed, 2 if the
    device cannot run here."""
    import sys

    try:
        devices = devices_for(device)
        backends = {d: backend_name(d) for d in devices}
        if "emu" in backends.values() and not _native.has_emulator():
            raise DeviceUnavailable("REPKERN_BACKEND=emu, but this build has no emulator module repkern._emu")
    except (DeviceUnavailable, ValueError, RuntimeError) as exc:  # also a bad REPKERN_BACKEND value
        print(f"repkern selftest: {exc}", file=sys.stderr)
        return 2
    if not as_json:
        names = ", ".join(f"{d} ({backends[d]} kernels)" for d in devices)
        skipped = f"; cuda skipped: {_cuda_problem()}" if device == "all" and "cuda" not in devices else ""
        print(f"repkern selftest ({'quick' if quick else 'full'}) on {names}{skipped}", flush=True)
    rows = run(device, quick=quick)
    print(to_json(rows) if as_json else format_table(rows))
    return 0 if rows and all(r.passed for r in rows) else 1


# ==== the case list ============================================================================


def _gram_case(variant, kernel, quick=False, batched=False, **kw) -> Case:
    def build(g, q):
        n = _rows(q)
        return {"x": _randn(g, 2, n, 12) if batched else _randn(g, n, 12)}

    return Case("gram", variant, build,
                lambda x: {"K": _ops("gram").gram(x, kernel, **kw)},
                lambda x: {"K": reference.gram(x, kernel, **kw)}, quick=quick)


def _pair_case(op, variant, kernel, quick=False, debiased=False, method="auto", batched=False, **kw) -> Case:
    fast_fn, ref_fn = {"hsic": (lambda: _ops("cka").hsic, reference.hsic),
                       "cka": (lambda: _ops("cka").cka, reference.cka)}[op]

    def build(g, q):
        n = _rows(q)
        if batched:
            x, y = zip(*[_pair(g, n) for _ in range(2)])
            return {"x": torch.stack(x), "y": torch.stack(y)}
        x, y = _pair(g, n)
        return {"x": x, "y": y}

    return Case(op, variant, build,
                lambda x, y: {op: fast_fn()(x, y, kernel, debiased=debiased, method=method, **kw)},
                lambda x, y: {op: ref_fn(x, y, kernel, debiased=debiased, **kw)}, quick=quick)


def _grams_case(variant, debiased, quick=False) -> Case:
    def build(g, q):
        x, y = _pair(g, _rows(q))
        return {"k": reference.gram(x, "rbf"), "l": reference.gram(y, "linear")}

    return Case("cka_from_grams", variant, build,
                lambda k, l: {"cka": _ops("cka").cka_from_grams(k, l, debiased=debiased)},
                lambda k, l: {"cka": reference.cka_from_grams(k, l, debiased=debiased)}, quick=quick)


def _matrix_case(variant, kernel, debiased, symmetric=False, method="auto", quick=False) -> Case:
    def build(g, q):
        n = _rows(q)
        return {"xs": _layers(g, n, (7, 12, 5)), "ys": None if symmetric else _layers(g, n, (9, 4))}

    return Case("cka_matrix", variant, build,
                lambda xs, ys: {"matrix": _ops("cka").cka_matrix(xs, ys, kernel, debiased=debiased, method=method)},
                lambda xs, ys: {"matrix": reference.cka_matrix(xs, ys, kernel, debiased=debiased)}, quick=quick)


def _split(layers, sizes):
    return None if layers is None else [list(parts) for parts in zip(*[t.split(sizes) for t in layers])]


def _streaming_case(variant, debiased, symmetric=False, quick=False) -> Case:
    """Mean-shifted layers in batches of unequal size (the last one short)."""

    def build(g, q):
        n = _rows(q)
        return {"xs": _layers(g, n, (7, 12, 5), shift=6.0), "ys": None if symmetric else _layers(g, n, (9, 4), -3.0)}

    def sizes(n):
        return [n // 3, n // 3, n - 2 * (n // 3) - 3, 3]

    def fast(xs, ys):
        acc = _ops("streaming").StreamingCKA(debiased=debiased)
        parts_x, parts_y = _split(xs, sizes(xs[0].shape[0])), _split(ys, sizes(xs[0].shape[0]))
        for i, bx in enumerate(parts_x):
            acc.update(bx, None if parts_y is None else parts_y[i])
        if acc.samples != xs[0].shape[0]:
            raise Mismatch(f"samples {acc.samples} != {xs[0].shape[0]}")
        return {"matrix": acc.compute()}

    return Case("StreamingCKA", variant, build, fast,
                lambda xs, ys: {"matrix": reference.cka_matrix(xs, ys, "linear", debiased=debiased)}, quick=quick)


def _minibatch_case(variant, kernel, debiased, quick=False, **kw) -> Case:
    def build(g, q):
        n = 3 * (8 if q else 16)
        return {"xs": _layers(g, n, (6, 3), shift=2.0), "ys": _layers(g, n, (4,))}

    def batches(xs, ys):
        b = xs[0].shape[0] // 3
        return list(zip(_split(xs, b), _split(ys, b)))

    def fast(xs, ys):
        acc = _ops("streaming").MinibatchCKA(kernel, debiased=debiased, **kw)
        for bx, by in batches(xs, ys):
            acc.update(bx, by)
        return {"matrix": acc.compute()}

    return Case("MinibatchCKA", variant, build, fast,
                lambda xs, ys: {"matrix": reference.minibatch_cka(batches(xs, ys), kernel, debiased=debiased, **kw)},
                quick=quick)


def _p_value_check(observed_field):
    """The p-value counts null values >= (a distance: <=) the observed value (output `observed_field`):
    it may differ by one step per null value within rounding of the observed one (in the float64
    reference)."""

    def check(fast, exact, dtype):
        tol = RELATIVE_TOLERANCE[F64 if dtype == F64 else F32]
        null, observed = exact["null"], exact[observed_field]
        scale = max(float(null.abs().max()) if null.numel() else 0.0, float(observed.abs()))
        ties = int(((null - observed).abs() <= 2 * tol * scale).sum())
        step = 1.0 / (1 + null.numel())
        err = abs(float(fast["p_value"]) - float(exact["p_value"]))
        return [("p_value", err, ties * step + (1e-12 if dtype == F64 else 1e-6))]

    return check


def _cka_test_case(variant, kernel, debiased, quick=False) -> Case:
    def build(g, q):
        x, y = _pair(g, _rows(q), noise=2.0)
        return {"x": x, "y": y}

    def counts(x):
        return dict(n_permutations=30 if x.shape[0] <= 24 else 60, n_bootstrap=20 if x.shape[0] <= 24 else 40, seed=7)

    def fields(result):
        return {f: getattr(result, f) for f in ("cka", "p_value", "ci_low", "ci_high", "null", "bootstrap")}

    return Case("cka_test", variant, build,
                lambda x, y: fields(_ops("cka_test").cka_test(x, y, kernel, debiased=debiased, **counts(x))),
                lambda x, y: fields(reference.cka_test(x, y, kernel, debiased=debiased, **counts(x))),
                quick=quick, skip=("p_value",), extra=_p_value_check("cka"))


def _stats_dict(stats, drop_rows=False) -> dict:
    """The tensor fields of a SparsityStats (row means as the statistic's dtype: they are float64 sums of
    float32 statistics for non-float64 input)."""
    out = {}
    for key, value in stats.to_dict().items():
        if value is None or not isinstance(value, (torch.Tensor, int)) or key in ("top_p", "eps", "dense_threshold"):
            continue
        if drop_rows and key in sr.ROW_STATS + ("nonfinite",):
            continue
        if key.startswith("row_mean/"):
            value = value.to(stats.mean.dtype)
        out[key] = value
    return out


SPARSITY_KW = dict(eps=0.05, top_p=(0.01, 0.1, 0.5), density_bins=12, row_bins=8)


def _sparsity_case(variant, quick=False, nonfinite=False, **kw) -> Case:
    kw = {**SPARSITY_KW, **kw}

    def build(g, q):
        a = _activations(g, 2, 10 if q else 24, 40)
        if nonfinite:
            a[0, 1, 3], a[1, 2, 5], a[1, 4, 7] = math.nan, math.inf, -math.inf
            a[0, 0] = 0.0  # an all-zero row: its ordered statistics are undefined (NaN)
        return {"a": a}

    return Case("sparsity_stats", variant, build,
                lambda a: _stats_dict(_ops("sparsity").sparsity_stats(a, **kw)),
                lambda a: _stats_dict(reference.sparsity_stats(a, **kw)), quick=quick)


def _accumulator_case(variant, keep_rows, quick=False, **kw) -> Case:
    kw = {**SPARSITY_KW, **kw}

    def build(g, q):
        return {"a": _activations(g, 30 if q else 70, 40)}

    def fast(a):
        acc = _ops("sparsity").SparsityAccumulator(a.shape[-1], keep_rows=keep_rows, **kw)
        for part in a.split(a.shape[0] // 3 + 1):
            acc.update(part)
        return _stats_dict(acc.compute())

    return Case("SparsityAccumulator", variant, build, fast,
                lambda a: _stats_dict(reference.sparsity_stats(a, **kw), drop_rows=not keep_rows), quick=quick)


def _check_csr(codes: CsrCodes) -> None:
    """Facts of a CsrCodes result: rows delimited from 0 to nnz, columns ascending within a row, no
    stored zero."""
    crow, cols = codes.crow_indices.cpu(), codes.col_indices.cpu()
    if int(crow[0]) != 0 or int(crow[-1]) != cols.numel() or bool((crow.diff() < 0).any()):
        raise Mismatch("CsrCodes: crow_indices do not rise from 0 to nnz")
    rows = codes.row_indices().cpu()
    same = rows[1:] == rows[:-1]
    if bool((cols[1:][same] <= cols[:-1][same]).any()):
        raise Mismatch("CsrCodes: columns do not ascend within a row")
    if bool((codes.values == 0).any()):
        raise Mismatch("CsrCodes: a stored code is 0")


def _codes_dict(codes, kw, fired=None) -> dict:
    out = {}
    if isinstance(codes, SparseCodes):
        if codes.values.shape[-1] != kw["k"]:
            raise Mismatch(f"SparseCodes: {codes.values.shape[-1]} codes per row, expected k={kw['k']}")
        out["indices"] = codes.indices
        codes = codes.to_dense()
    elif isinstance(codes, CsrCodes):
        _check_csr(codes)
        codes = codes.to_dense()
    elif kw.get("output") == "sparse":
        raise Mismatch(f"output='sparse' returned {type(codes).__name__}")
    out["codes"] = codes
    if fired is not None:
        out["fired"] = fired
    return out


def _encode_case(variant, quick=False, theta=None, count_firings=False, bias_scale=0.3, chunk_bytes=None,
                 **kw) -> Case:
    """theta: 'features' for a (d_sae,) JumpReLU threshold among the inputs; chunk_bytes: the fast op's
    chunk budget (small: the chunk and row-block merges run)."""

    def build(g, q):
        inputs = _sae_inputs(g, q, bias_scale)
        if theta == "features":
            inputs["threshold"] = _thresholds(g, inputs)
        return inputs

    def fast(x, W_enc, b_enc, b_dec, **t):
        out = _ops("sae").sae_encode(x, W_enc, b_enc, b_dec=b_dec, count_firings=count_firings,
                                     chunk_bytes=chunk_bytes, **t, **kw)
        codes, fired = out if count_firings else (out, None)
        return _codes_dict(codes, kw, fired)

    def ref(x, W_enc, b_enc, b_dec, **t):
        codes = reference.sae_encode(x, W_enc, b_enc, b_dec=b_dec, **t, **kw)
        fired = None
        if count_firings:
            dense = codes if isinstance(codes, torch.Tensor) else codes.to_dense()
            fired = (dense != 0).reshape(-1, dense.shape[-1]).sum(0)
        return _codes_dict(codes, kw, fired)

    return Case("sae_encode", variant, build, fast, ref, quick=quick)


def _decode_case(variant, form, quick=False) -> Case:
    def build(g, q):
        inputs = _sae_inputs(g, q)
        kw = {"dense": {}, "topk": dict(activation="topk", k=6, output="sparse"), "csr": dict(output="sparse")}[form]
        codes = reference.sae_encode(inputs["x"], inputs["W_enc"], inputs["b_enc"], b_dec=inputs["b_dec"], **kw)
        return {"codes": codes, "W_dec": inputs["W_enc"].mT.contiguous(), "b_dec": inputs["b_dec"]}

    return Case("sae_decode", variant, build,
                lambda codes, W_dec, b_dec: {"x_hat": _ops("sae").sae_decode(codes, W_dec, b_dec)},
                lambda codes, W_dec, b_dec: {"x_hat": reference.sae_decode(codes, W_dec, b_dec)}, quick=quick)


def _sae_module_case(variant, quick=False, theta=None, apply_b_dec_to_input=True, **kw) -> Case:
    def build(g, q):
        inputs = _sae_inputs(g, q)
        d_in, d_sae = inputs["W_enc"].shape
        inputs["W_dec"] = _randn(g, d_sae, d_in) / math.sqrt(d_sae)
        if theta == "features":
            inputs["threshold"] = _thresholds(g, inputs)
        return inputs

    def fast(x, W_enc, b_enc, W_dec, b_dec, **t):
        sae = _sae_module().SAE(W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input=apply_b_dec_to_input, **t, **kw)
        return {"x_hat": sae(x)}

    def ref(x, W_enc, b_enc, W_dec, b_dec, **t):
        enc = {k: v for k, v in kw.items() if k != "output"}
        codes = reference.sae_encode(x, W_enc, b_enc, b_dec=b_dec if apply_b_dec_to_input else None, **t, **enc)
        return {"x_hat": reference.sae_decode(codes, W_dec, b_dec)}

    return Case("SAE", variant, build, fast, ref, quick=quick)


# ---- alignment: kNN, shape, CCA, RSA, many layers (no gradients: none of these ops has one) -------


KNN_TILE_BYTES = 1024  # knn tile_bytes of the "tiles" cases: 16-row blocks, so off-diagonal tiles merge too


def _clusters(g, n, count, size=4):
    """`count` layers (n, 16), (n, 12), (n, 16), ...: n/size tight clusters of `size` rows around unit-norm
    centres, so every row's size − 1 nearest rows (cosine, ip, euclidean) are its cluster, far from the
    next one: the kNN metrics with k = size − 1 have no near-tie at the k-th neighbour. Each layer after
    the first regroups a random quarter of the rows (same cluster sizes), which puts mutual_knn,
    cycle_knn and cknna between them inside (0, 1)."""
    labels = torch.arange(n) // size
    layers = []
    for i in range(count):
        lab = labels.clone()
        if i:
            moved = torch.randperm(n, generator=g)[: n // 4]
            lab[moved] = labels[moved[torch.randperm(moved.numel(), generator=g)]]
        d = 16 if i % 2 == 0 else 12
        centres = _randn(g, n // size, d)
        layers.append(centres[lab] / centres.norm(dim=1, keepdim=True)[lab] + 0.05 * _randn(g, n, d))
    return layers


def _neighbour_check(fast, exact, dtype):
    """knn indices, ties allowed: each row lists other rows, each at most once, and the float64 reference
    value of the neighbour listed at rank r is the reference's value at rank r (equal values may come in
    either order)."""
    idx, sim, ref = fast["indices"], exact["similarity"], exact["values"]
    n = sim.shape[0]
    if idx.dtype != torch.int64 or idx.shape != ref.shape:
        raise Mismatch(f"indices: {idx.dtype} {tuple(idx.shape)}, expected int64 {tuple(ref.shape)}")
    if bool(((idx < 0) | (idx >= n) | (idx == torch.arange(n)[:, None])).any()):
        raise Mismatch("indices: a row lists itself or a row number outside [0, n)")
    ordered = idx.sort(1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise Mismatch("indices: a row lists a neighbour twice")
    got = sim.gather(1, idx)
    if not torch.equal(got.isnan(), ref.isnan()):
        raise Mismatch("indices: a neighbour with a NaN similarity where the reference has a number, or back")
    scale = float(ref.nan_to_num(0).abs().max()) or 1.0
    err = float((got - ref).nan_to_num(0).abs().max()) / scale
    return [("indices", err, RELATIVE_TOLERANCE[F64 if dtype == F64 else F32])]


def _knn_case(variant, metric, k, quick=False, shift=0.0, nan_row=False, **kw) -> Case:
    """nan_row: row 3 is NaN (it ranks last for every other row; its own neighbours all tie at NaN)."""

    def build(g, q):
        x = _randn(g, _rows(q), 8) + shift
        if nan_row:
            x[3] = math.nan
        return {"x": x}

    def fast(x):
        values, indices = _ops("knn").knn(x, k, metric=metric, **kw)
        return {"values": values, "indices": indices}

    def ref(x):
        values, indices = reference.knn(x, k, metric=metric)
        return {"values": values, "indices": indices, "similarity": similarities(x, metric)}

    return Case("knn", variant, build, fast, ref, quick=quick, skip=("indices", "similarity"),
                extra=_neighbour_check)


def _knn_pair_case(op, variant, quick=False, tile_bytes=None, **kw) -> Case:
    """mutual_knn / cycle_knn / cknna of clustered data with k = 3 (no near-tie at the 3rd neighbour)."""

    def build(g, q):
        x, y = _clusters(g, _rows(q), 2)
        return {"x": x, "y": y}

    return Case(op, variant, build,
                lambda x, y: {op: getattr(_ops("knn"), op)(x, y, 3, tile_bytes=tile_bytes, **kw)},
                lambda x, y: {op: getattr(reference, op)(x, y, 3, **kw)}, quick=quick)


def _pair_stat_case(op, variant, quick=False, widths=(10, 6), **kw) -> Case:
    """A scalar or vector statistic of a pair (shape_distance, cca, svcca, pwcca, rsa)."""
    module = {"shape_distance": "shape", "cca": "cca", "svcca": "cca", "pwcca": "cca", "rsa": "rsa"}[op]

    def build(g, q):
        x, y = _pair(g, _rows(q), *widths)
        return {"x": x, "y": y}

    return Case(op, variant, build,
                lambda x, y: {op: getattr(_ops(module), op)(x, y, **kw)},
                lambda x, y: {op: getattr(reference, op)(x, y, **kw)}, quick=quick)


def _rdm_case(variant, metric, quick=False) -> Case:
    return Case("rdm", variant, lambda g, q: {"x": _randn(g, _rows(q), 9)},
                lambda x: {"rdm": _ops("rsa").rdm(x, metric)},
                lambda x: {"rdm": reference.rdm(x, metric)}, quick=quick)


def _similarity_layers(g, n, metric):
    """Three xs layers and two ys layers: clustered for the kNN metrics, noisy maps of one signal
    otherwise."""
    if metric in ("mutual_knn", "cycle_knn", "cknna"):
        layers = _clusters(g, n, 5)
        return layers[:3], layers[3:]
    return _layers(g, n, (7, 12, 5)), _layers(g, n, (9, 4))


def _similarity_matrix_case(variant, metric, symmetric=False, quick=False, **options) -> Case:
    """symmetric (ys=None) sets the diagonal to exactly 1 where the reference keeps its rounding: fine for
    the correlations (1 ± ε), not for the angular shape distance (0 against ~2e-8 rad), so no ys=None
    case for that."""

    def build(g, q):
        xs, ys = _similarity_layers(g, _rows(q), metric)
        return {"xs": xs, "ys": None if symmetric else ys}

    return Case("similarity_matrix", variant, build,
                lambda xs, ys: {"matrix": _ops("similarity").similarity_matrix(xs, ys, metric=metric, **options)},
                lambda xs, ys: {"matrix": reference.similarity_matrix(xs, ys, metric=metric, **options)},
                quick=quick)


def _similarity_test_case(variant, metric, quick=False, **options) -> Case:
    def build(g, q):
        xs, ys = _similarity_layers(g, _rows(q), metric)
        return {"x": xs[0], "y": ys[0]}

    def fields(result):
        return {"value": result.value, "p_value": result.p_value, "null": result.null}

    # 20 permutations at every size: the reference recomputes the metric from scratch for each one
    return Case("similarity_test", variant, build,
                lambda x, y: fields(_ops("similarity").similarity_test(x, y, metric=metric, n_permutations=20, seed=5,
                                                                       **options)),
                lambda x, y: fields(reference.similarity_test(x, y, metric=metric, n_permutations=20, seed=5,
                                                              **options)),
                quick=quick, skip=("p_value",), extra=_p_value_check("value"))


def _streaming_alignment_case(variant, debiased, symmetric=False, quick=False, shape=None) -> Case:
    """Every metric of compute() from mean-shifted layers in batches of unequal size (the last one a
    single row). `shape`: the shape_distance options (ys=None: compute() makes its diagonal exactly 0,
    so the euclidean score, whose reference is 0 to rounding too; the angular one's is ~2e-8 rad)."""
    options = {"cka": {}, "shape_distance": shape or {}, "svcca": {}, "pwcca": {}}
    ref_options = {**options, "cka": {"kernel": "linear", "debiased": debiased}}

    def build(g, q):
        n = _rows(q)
        return {"xs": _layers(g, n, (7, 5), shift=4.0), "ys": None if symmetric else _layers(g, n, (4, 6), -2.0)}

    def sizes(n):
        return [n // 2, n - n // 2 - 1, 1]

    def with_cca(out, cca):
        """cca's list of lists of vectors, entry by entry."""
        for i, row in enumerate(cca):
            out.update({f"cca[{i}][{j}]": rho for j, rho in enumerate(row)})
        return out

    def fast(xs, ys):
        acc = _ops("streaming_alignment").StreamingAlignment(debiased=debiased)
        parts_x, parts_y = _split(xs, sizes(xs[0].shape[0])), _split(ys, sizes(xs[0].shape[0]))
        for i, bx in enumerate(parts_x):
            acc.update(bx, None if parts_y is None else parts_y[i])
        return with_cca({m: acc.compute(m, **kw) for m, kw in options.items()}, acc.compute("cca"))

    def ref(xs, ys):
        out = {m: reference.similarity_matrix(xs, ys, metric=m, **kw) for m, kw in ref_options.items()}
        return with_cca(out, [[reference.cca(x, y) for y in (xs if ys is None else ys)] for x in xs])

    return Case("StreamingAlignment", variant, build, fast, ref, quick=quick)


# ---- backward cases: gradients against the reference's autograd -----------------------------------


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _grads(names, leaves):
    return {f"grad_{n}": (t.grad if t.grad is not None else torch.zeros_like(t)) for n, t in zip(names, leaves)}


def _gram_backward_case(kernel, quick=False, **kw) -> Case:
    def build(g, q):
        n = _rows(q)
        return {"x": _randn(g, n, 12), "w": _randn(g, n, n)}

    def make(fn):
        def grads(x, w):
            (xg,) = _leaves(x)
            (fn(xg, kernel, **kw) * w).sum().backward()
            return _grads(("x",), (xg,))
        return grads

    return Case("gram backward", kernel + ("" if not kw else " " + " ".join(f"{k}={v}" for k, v in kw.items())),
                build, make(lambda *a, **k: _ops("gram").gram(*a, **k)), make(reference.gram),
                dtypes=FULL_PRECISION, quick=quick)


def _pair_backward_case(op, variant, kernel, debiased=False, method="auto", quick=False, tolerance=None,
                        **kw) -> Case:
    fast_fn, ref_fn = {"hsic": (lambda: _ops("cka").hsic, reference.hsic),
                       "cka": (lambda: _ops("cka").cka, reference.cka)}[op]

    def build(g, q):
        x, y = _pair(g, _rows(q))
        return {"x": x, "y": y}

    def make(fn, fast):
        def grads(x, y):
            xg, yg = _leaves(x, y)
            extra = {"method": method} if fast else {}
            fn()(xg, yg, kernel, debiased=debiased, **kw, **extra).sum().backward()
            return _grads(("x", "y"), (xg, yg))
        return grads

    return Case(f"{op} backward", variant, build, make(fast_fn, True), make(lambda: ref_fn, False),
                dtypes=FULL_PRECISION, quick=quick, tolerance=tolerance or {})


def _matrix_backward_case(variant, kernel, debiased, method="auto", quick=False) -> Case:
    def build(g, q):
        n = _rows(q)
        return {"xs": _layers(g, n, (7, 5)), "ys": _layers(g, n, (4, 6)), "w": _randn(g, 2, 2)}

    def make(fn):
        def grads(xs, ys, w):
            leaves = _leaves(*xs, *ys)
            (fn(leaves[:2], leaves[2:], kernel, debiased=debiased) * w).sum().backward()
            return _grads(("xs0", "xs1", "ys0", "ys1"), leaves)
        return grads

    return Case("cka_matrix backward", variant, build,
                make(lambda *a, **k: _ops("cka").cka_matrix(*a, method=method, **k)), make(reference.cka_matrix),
                dtypes=FULL_PRECISION, quick=quick)


def _encode_backward_case(variant, quick=False, theta=None, **kw) -> Case:
    names = ("x", "W_enc", "b_enc", "b_dec") + (("threshold",) if theta else ())

    def build(g, q):
        inputs = _sae_inputs(g, q, bias_scale=0.8)
        inputs["w"] = _randn(g, *inputs["x"].shape[:-1], inputs["b_enc"].shape[0])
        if theta:
            inputs["threshold"] = _thresholds(g, inputs)
        return inputs

    def make(fn):
        def grads(w, **inputs):
            leaves = _leaves(*(inputs[n] for n in names))
            args = dict(zip(names, leaves))
            codes = fn()(args.pop("x"), args.pop("W_enc"), args.pop("b_enc"), **args, **kw)
            dense = codes if isinstance(codes, torch.Tensor) else codes.to_dense()
            (dense * w).sum().backward()
            return _grads(names, leaves)
        return grads

    return Case("sae_encode backward", variant, build, make(lambda: _ops("sae").sae_encode),
                make(lambda: reference.sae_encode), dtypes=FULL_PRECISION, quick=quick)


def _decode_backward_case(variant, form, quick=False) -> Case:
    def build(g, q):
        inputs = _sae_inputs(g, q)
        kw = {"dense": {}, "topk": dict(activation="topk", k=6, output="sparse")}[form]
        codes = reference.sae_encode(inputs["x"], inputs["W_enc"], inputs["b_enc"], b_dec=inputs["b_dec"], **kw)
        return {"codes": codes, "W_dec": inputs["W_enc"].mT.contiguous(), "b_dec": inputs["b_dec"],
                "w": _randn(g, *inputs["x"].shape)}

    def make(fn):
        def grads(codes, W_dec, b_dec, w):
            values = codes.values if isinstance(codes, SparseCodes) else codes
            v, wd, bd = _leaves(values, W_dec, b_dec)
            arg = codes._replace(values=v) if isinstance(codes, SparseCodes) else v
            (fn()(arg, wd, bd) * w).sum().backward()
            return _grads(("codes", "W_dec", "b_dec"), (v, wd, bd))
        return grads

    return Case("sae_decode backward", variant, build, make(lambda: _ops("sae").sae_decode),
                make(lambda: reference.sae_decode), dtypes=FULL_PRECISION, quick=quick)


def cases() -> list:
    """The case list, in table order (``quick=True``: part of ``--quick``)."""
    Q = True
    return [
        # gram: each kernel, the median variants, an explicit bandwidth, centering, batch dims
        _gram_case("linear", "linear", quick=Q),
        _gram_case("cosine", "cosine", quick=Q),
        _gram_case("rbf median", "rbf", quick=Q),
        _gram_case("rbf sigma=3", "rbf", sigma=3.0),
        _gram_case("rbf offdiag threshold=0.5", "rbf", median="offdiag", threshold=0.5),
        _gram_case("linear center", "linear", center=True, quick=Q),
        _gram_case("cosine center", "cosine", center=True),
        _gram_case("rbf center batched", "rbf", center=True, batched=True),
        # hsic / cka: biased and unbiased, each kernel, the feature / gram / tiled paths
        _pair_case("hsic", "linear biased feature", "linear", method="feature", quick=Q),
        _pair_case("hsic", "linear debiased gram", "linear", debiased=True, method="gram"),
        _pair_case("hsic", "rbf biased gram", "rbf", method="gram", quick=Q),
        _pair_case("hsic", "rbf debiased tiled", "rbf", debiased=True, method="tiled"),
        _pair_case("hsic", "cosine biased tiled", "cosine", method="tiled"),
        _pair_case("cka", "linear biased feature", "linear", method="feature", quick=Q),
        _pair_case("cka", "linear debiased feature", "linear", debiased=True, method="feature"),
        _pair_case("cka", "linear biased gram", "linear", method="gram"),
        _pair_case("cka", "linear debiased tiled", "linear", debiased=True, method="tiled", quick=Q),
        _pair_case("cka", "rbf biased gram", "rbf", method="gram", quick=Q),
        _pair_case("cka", "rbf debiased tiled", "rbf", debiased=True, method="tiled"),
        _pair_case("cka", "rbf sigma=3 gram", "rbf", method="gram", sigma=3.0),
        _pair_case("cka", "cosine debiased gram", "cosine", debiased=True, method="gram"),
        _pair_case("cka", "linear debiased batched auto", "linear", debiased=True, batched=True),
        _grams_case("biased", False, quick=Q),
        _grams_case("debiased", True),
        _matrix_case("linear biased feature", "linear", False, method="feature", quick=Q),
        _matrix_case("linear debiased gram", "linear", True, method="gram"),
        _matrix_case("rbf debiased tiled", "rbf", True, method="tiled"),
        _matrix_case("rbf symmetric (ys=None)", "rbf", False, symmetric=True, quick=Q),
        # streaming accumulators
        _streaming_case("biased", False, quick=Q),
        _streaming_case("debiased", True),
        _streaming_case("debiased symmetric (ys=None)", True, symmetric=True),
        _minibatch_case("linear debiased", "linear", True, quick=Q),
        _minibatch_case("linear biased", "linear", False),
        _minibatch_case("rbf debiased", "rbf", True),
        _minibatch_case("cosine debiased", "cosine", True),
        # permutation test: observed value, null, bootstrap, interval, p-value (fixed seed)
        _cka_test_case("linear biased", "linear", False, quick=Q),
        _cka_test_case("rbf debiased", "rbf", True),
        # sparsity
        _sparsity_case("ordered", quick=Q),
        _sparsity_case("one-read (ordered=False)", ordered=False, quick=Q),
        _sparsity_case("ordered, NaN/Inf and a zero row", nonfinite=True),
        _accumulator_case("3 batches", keep_rows=False, quick=Q),
        _accumulator_case("3 batches keep_rows", keep_rows=True),
        # SAE encode: each activation, dense and sparse codes
        _encode_case("relu dense count_firings", count_firings=True, quick=Q),
        _encode_case("relu sparse (csr)", output="sparse", quick=Q),
        _encode_case("topk dense", activation="topk", k=5),
        _encode_case("topk sparse", activation="topk", k=5, output="sparse", quick=Q),
        _encode_case("topk relu_first sparse", activation="topk", k=5, relu_first=True, output="sparse"),
        _encode_case("topk sparse chunked", activation="topk", k=9, output="sparse", chunk_bytes=SMALL_CHUNKS),
        _encode_case("relu dense chunked", chunk_bytes=SMALL_CHUNKS),
        _encode_case("jumprelu dense", activation="jumprelu", theta="features", quick=Q),
        _encode_case("jumprelu sparse (csr) scalar threshold", activation="jumprelu", threshold=0.4, output="sparse"),
        _encode_case("batchtopk k dense", activation="batchtopk", k=4.0, bias_scale=1.0),
        _encode_case("batchtopk k sparse (csr)", activation="batchtopk", k=4.0, output="sparse", bias_scale=1.0,
                     quick=Q),
        _encode_case("batchtopk threshold sparse (csr)", activation="batchtopk", threshold=0.3, output="sparse"),
        _encode_case("batchtopk k sparse (csr) chunked", activation="batchtopk", k=4.0, output="sparse",
                     bias_scale=1.0, chunk_bytes=SMALL_CHUNKS),
        _decode_case("dense codes", "dense", quick=Q),
        _decode_case("topk SparseCodes", "topk", quick=Q),
        _decode_case("CsrCodes", "csr"),
        _sae_module_case("relu forward", activation="relu"),
        _sae_module_case("topk forward (sparse codes)", activation="topk", k=5, output="sparse", quick=Q),
        _sae_module_case("jumprelu forward, no b_dec on input", activation="jumprelu", theta="features",
                         apply_b_dec_to_input=False),
        # alignment: kNN (values, and neighbours up to ties), shape, CCA, RSA, many layers, streaming
        _knn_case("cosine", "cosine", 5, quick=Q),
        _knn_case("cosine k=20 tiles", "cosine", 20, tile_bytes=KNN_TILE_BYTES),
        _knn_case("cosine k=20 NaN row tiles", "cosine", 20, nan_row=True, tile_bytes=KNN_TILE_BYTES),
        _knn_case("euclidean NaN row", "euclidean", 5, nan_row=True),
        _knn_case("ip tiles", "ip", 5, tile_bytes=KNN_TILE_BYTES),
        _knn_case("euclidean shifted tiles", "euclidean", 5, shift=3.0, tile_bytes=KNN_TILE_BYTES, quick=Q),
        _knn_pair_case("mutual_knn", "cosine", quick=Q),
        _knn_pair_case("mutual_knn", "euclidean tiles", metric="euclidean", tile_bytes=KNN_TILE_BYTES),
        _knn_pair_case("cycle_knn", "cosine", quick=Q),
        _knn_pair_case("cycle_knn", "ip tiles", metric="ip", tile_bytes=KNN_TILE_BYTES),
        _knn_pair_case("cknna", "k=3", quick=Q),
        _knn_pair_case("cknna", "k=3 tiles", tile_bytes=KNN_TILE_BYTES),
        _pair_stat_case("shape_distance", "alpha=1 angular", quick=Q),
        _pair_stat_case("shape_distance", "alpha=0.5 euclidean", alpha=0.5, score="euclidean"),
        _pair_stat_case("shape_distance", "alpha=0 angular (equal widths)", widths=(6, 6), alpha=0.0),
        _pair_stat_case("cca", "all correlations", quick=Q),
        _pair_stat_case("svcca", "keep=0.99", quick=Q),
        _pair_stat_case("svcca", "dims=(5, 3)", dims=(5, 3)),
        _pair_stat_case("pwcca", "weights from x", quick=Q),
        _rdm_case("correlation", "correlation", quick=Q),
        _rdm_case("euclidean", "euclidean"),
        _pair_stat_case("rsa", "correlation spearman", quick=Q),
        _pair_stat_case("rsa", "euclidean pearson", rdm="euclidean", compare="pearson"),
        _similarity_matrix_case("cknna k=3", "cknna", k=3, quick=Q),
        _similarity_matrix_case("mutual_knn k=3 euclidean tiles", "mutual_knn", k=3, knn_metric="euclidean",
                                tile_bytes=KNN_TILE_BYTES),
        _similarity_matrix_case("cycle_knn k=3 (ys=None)", "cycle_knn", symmetric=True, k=3),
        _similarity_matrix_case("shape_distance alpha=0.5", "shape_distance", alpha=0.5),
        _similarity_matrix_case("svcca dims=3 (ys=None)", "svcca", symmetric=True, dims=3),
        _similarity_matrix_case("pwcca", "pwcca"),
        _similarity_matrix_case("rsa spearman (ys=None)", "rsa", symmetric=True),
        _similarity_matrix_case("cka rbf debiased", "cka", kernel="rbf", debiased=True),
        _similarity_test_case("mutual_knn k=3", "mutual_knn", k=3, quick=Q),
        _similarity_test_case("cycle_knn k=3 ip", "cycle_knn", k=3, knn_metric="ip"),
        _similarity_test_case("cknna k=3", "cknna", k=3),
        _similarity_test_case("shape_distance", "shape_distance"),
        _similarity_test_case("svcca", "svcca"),
        _similarity_test_case("pwcca", "pwcca"),
        _similarity_test_case("rsa pearson", "rsa", compare="pearson"),
        _similarity_test_case("cka linear", "cka"),
        _streaming_alignment_case("biased", False, quick=Q),
        _streaming_alignment_case("debiased symmetric (ys=None)", True, symmetric=True,
                                  shape=dict(alpha=0.5, score="euclidean")),
        # backward: gradients against the reference's autograd
        _gram_backward_case("linear", quick=Q),
        _gram_backward_case("cosine"),
        _gram_backward_case("rbf", quick=Q),
        _gram_backward_case("rbf", sigma=3.0, center=True),
        _pair_backward_case("cka", "linear biased feature", "linear", method="feature", quick=Q),
        _pair_backward_case("cka", "linear debiased gram", "linear", debiased=True, method="gram"),
        _pair_backward_case("cka", "linear biased tiled", "linear", method="tiled"),
        _pair_backward_case("cka", "rbf debiased gram", "rbf", debiased=True, method="gram", quick=Q,
                            tolerance=MEDIAN_GRADIENT_TOLERANCE),
        _pair_backward_case("cka", "rbf biased tiled", "rbf", method="tiled", tolerance=MEDIAN_GRADIENT_TOLERANCE),
        _pair_backward_case("cka", "rbf sigma=3 debiased tiled", "rbf", debiased=True, method="tiled", sigma=3.0),
        _pair_backward_case("cka", "cosine biased tiled", "cosine", method="tiled"),
        _pair_backward_case("hsic", "rbf debiased gram", "rbf", debiased=True, method="gram",
                            tolerance=MEDIAN_GRADIENT_TOLERANCE),
        _matrix_backward_case("linear debiased gram", "linear", True, method="gram"),
        _encode_backward_case("relu dense", quick=Q),
        _encode_backward_case("relu sparse (csr)", output="sparse"),
        _encode_backward_case("topk sparse", activation="topk", k=5, output="sparse", quick=Q),
        _encode_backward_case("jumprelu dense, threshold", activation="jumprelu", theta=True, bandwidth=0.1),
        _encode_backward_case("batchtopk k dense", activation="batchtopk", k=4.0),
        _decode_backward_case("dense codes", "dense"),
        _decode_backward_case("topk SparseCodes", "topk", quick=Q),
    ]
