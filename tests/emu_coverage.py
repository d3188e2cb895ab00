"""Emulator coverage of the CUDA kernels' rendezvous points (pytest plugin).

Every ``__syncthreads()`` and warp collective (``__syncwarp``, ``__shfl*_sync``,
``__ballot_sync``, ``__any_sync``, ``__all_sync``) in csrc/cuda must be reached by the
emulator test run, and one inside a loop must be passed at least twice by one block: a
barrier that protects scratch reused by the next iteration (or the next call of a helper)
is only tested when a block really comes back to it.

Sites are found by scanning the sources at test time (``scan_sites``), so the list cannot go
stale when a kernel changes:

* a site is ``file:line`` (relative to csrc/, e.g. ``cuda/sparsity.cu:184``); several calls
  on one line are one site; template instantiations, and the kernels that reach a helper's
  site, are merged: a helper in reduce.cuh called from several kernels is one site per line,
  covered when any kernel passes it (the failure message names the kernels that did);
* a site *repeats* when it lies inside a loop (the condition, increment and body of a
  ``for`` / ``while`` / ``do``; not a ``for``'s init) of its function, or when its function is
  a ``__device__`` helper with a call that repeats (recursively): then some block must pass it
  twice. A helper called twice in straight-line code does not count as a loop.

The emulator (``repkern._emu``) counts, per kernel and call site, the most times one thread of
one block passed it (``coverage()``; ``reset_coverage()``). ``test_emu_coverage.py`` holds the
test that compares the two; this plugin resets the counts before the run, puts that test
last, and tells it whether the whole emulator test set is running: every tests/test_*.py
collected, no emulator test deselected (``-k``/``-m``/``--deselect``/``--lf``; so ``-k emu`` is a
whole run, CI's ``-m emu_smoke`` AddressSanitizer run is not) and none failed. Otherwise the test
is skipped with the reason. Emulator tests are those with an ``emu-*`` backend parameter and
those of test_emulator.py.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
TESTS = ROOT / "tests"
COVERAGE_TEST = "test_emu_coverage.py::test_every_kernel_rendezvous_is_exercised"

RENDEZVOUS = (
    "__syncthreads",
    "__syncwarp",
    "__shfl_sync",
    "__shfl_up_sync",
    "__shfl_down_sync",
    "__shfl_xor_sync",
    "__ballot_sync",
    "__any_sync",
    "__all_sync",
)
LOOP_KEYWORDS = ("for", "while", "do")


# ---- source scanner -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Site:
    file: str  # relative to csrc/, e.g. "cuda/sae.cu"
    line: int
    what: str  # the intrinsic's name
    function: str  # enclosing function
    kernel: bool  # the enclosing function is a __global__ kernel
    in_loop: bool  # lexically inside a loop of its function
    repeats: bool  # in_loop, or in a helper called where it repeats

    @property
    def key(self) -> str:
        return f"{self.file}:{self.line}"


def _strip(text: str) -> str:
    """Comments, string/char literals and preprocessor lines blanked out; newlines kept."""
    out = []
    i, n = 0, len(text)
    at_line_start = True
    while i < n:
        c = text[i]
        if at_line_start and c in " \t":
            out.append(c)
            i += 1
            continue
        if at_line_start and c == "#":  # preprocessor line, with continuations
            while i < n and text[i] != "\n":
                if text[i] == "\\" and i + 1 < n and text[i + 1] == "\n":
                    out.append("\n")
                    i += 2
                    continue
                i += 1
            at_line_start = False
            continue
        at_line_start = False
        if text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
            continue
        if text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append("".join("\n" if ch == "\n" else " " for ch in text[i:end]))
            i = end
            continue
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(" " * (j + 1 - i))
            i = j + 1
            continue
        if c == "\n":
            at_line_start = True
        out.append(c)
        i += 1
    return "".join(out)


_TOKEN = re.compile(r"[A-Za-z_]\w*|\d[\w.]*|::|->|\S")


def _tokens(text: str):
    toks, lines = [], []
    for lineno, line in enumerate(_strip(text).split("\n"), start=1):
        for m in _TOKEN.finditer(line):
            toks.append(m.group(0))
            lines.append(lineno)
    return toks, lines


def _matches(toks):
    """Index of the partner of every bracket ((), [], {})."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack, match = [], {}
    for i, t in enumerate(toks):
        if t in "([{":
            stack.append(i)
        elif t in pairs:
            if not stack or toks[stack[-1]] != pairs[t]:
                raise ValueError(f"unbalanced {t!r} at token {i}")
            j = stack.pop()
            match[i], match[j] = j, i
    if stack:
        raise ValueError(f"unclosed {toks[stack[-1]]!r} at token {stack[-1]}")
    return match


class _Parser:
    def __init__(self, toks):
        self.toks = toks
        self.match = _matches(toks)

    def stmt_end(self, i: int) -> int:
        """Index of the last token of the statement that starts at token i."""
        t, toks = self.toks[i], self.toks
        if t == "{":
            return self.match[i]
        if t in ("for", "while", "switch") and i + 1 < len(toks) and toks[i + 1] == "(":
            return self.stmt_end(self.match[i + 1] + 1)
        if t == "if":
            j = i + 1
            if toks[j] == "constexpr":
                j += 1
            end = self.stmt_end(self.match[j] + 1)
            if end + 1 < len(toks) and toks[end + 1] == "else":
                end = self.stmt_end(end + 2)
            return end
        if t == "do":
            body_end = self.stmt_end(i + 1)  # then: while ( ... ) ;
            return self.match[body_end + 2] + 1
        j = i
        while j < len(toks) and toks[j] != ";":
            j = self.match[j] + 1 if toks[j] in "([{" else j + 1
        return j

    def loop_ranges(self, lo: int, hi: int):
        """(first, last) token ranges that a loop in toks[lo..hi] runs more than once."""
        toks, ranges = self.toks, []
        for i in range(lo, hi + 1):
            t = toks[i]
            if t == "for" and toks[i + 1] == "(":
                close = self.match[i + 1]
                semis = [j for j in range(i + 2, close) if toks[j] == ";" and self._depth0(i + 1, j)]
                start = semis[0] + 1 if semis else close  # range-for: the range expression runs once
                ranges.append((start, self.stmt_end(close + 1)))
            elif t == "while" and toks[i + 1] == "(":
                close = self.match[i + 1]
                if toks[i - 1] == "}" and self._opened_by_do(self.match[i - 1]):
                    ranges.append((i, close))  # do { } while (cond): the condition repeats
                else:
                    ranges.append((i, self.stmt_end(close + 1)))
            elif t == "do":
                ranges.append((i, self.stmt_end(i + 1)))
        return ranges

    def _opened_by_do(self, brace: int) -> bool:
        return brace > 0 and self.toks[brace - 1] == "do"

    def _depth0(self, open_paren: int, j: int) -> bool:
        depth = 0
        for k in range(open_paren + 1, j):
            if self.toks[k] in "([{":
                depth += 1
            elif self.toks[k] in ")]}":
                depth -= 1
        return depth == 0

    def functions(self):
        """(name, is_kernel, name_index, body_open, body_close) of every function definition at
        namespace scope (bodies of types are skipped; lambdas belong to their function)."""
        toks, out = self.toks, []
        i, n = 0, len(toks)
        decl_start = 0
        while i < n:
            t = toks[i]
            if t == "namespace":
                j = i + 1
                while toks[j] != "{" and toks[j] != ";" and toks[j] != "=":
                    j += 1
                if toks[j] == "{":  # namespace scope: descend
                    i = decl_start = j + 1
                    continue
                i = decl_start = j + 1
                continue
            if t == "}":  # end of a namespace
                i = decl_start = i + 1
                continue
            if t == ";":
                i = decl_start = i + 1
                continue
            if t in ("struct", "class", "union", "enum"):
                j = i
                while toks[j] not in ("{", ";"):
                    j += 1
                if toks[j] == "{":
                    i = self.match[j] + 1  # the type body; its ';' follows
                else:
                    i = j
                continue
            if t == "{":
                head = toks[decl_start:i]
                close = None
                for k in range(i - 1, decl_start - 1, -1):
                    if toks[k] == ")":
                        close = k
                        break
                    if toks[k] in ("=",):
                        break
                if close is not None and "=" not in toks[decl_start : self.match[close]]:
                    open_ = self.match[close]
                    name_idx = open_ - 1
                    if toks[name_idx] == ">":  # an explicit specialization: name<args>(...)
                        name_idx = self._before_template_args(name_idx)
                    out.append((toks[name_idx], "__global__" in head, name_idx, i, self.match[i]))
                i = decl_start = self.match[i] + 1
                continue
            i += 1
        return out

    def _before_template_args(self, gt: int) -> int:
        depth, k = 0, gt
        while k >= 0:
            if self.toks[k] == ">":
                depth += 1
            elif self.toks[k] == "<":
                depth -= 1
                if depth == 0:
                    return k - 1
            k -= 1
        return gt


def _calls(toks, name: str, exclude: int):
    """Token indices of calls `name(` / `name<...>(` other than the definition's name token."""
    out = []
    for i, t in enumerate(toks):
        if t != name or i == exclude or (i > 0 and toks[i - 1] in (".", "->")):
            continue
        j = i + 1
        if j < len(toks) and toks[j] == "<":
            depth = 0
            while j < len(toks):
                if toks[j] == "<":
                    depth += 1
                elif toks[j] == ">":
                    depth -= 1
                    if depth == 0:
                        break
                elif toks[j] in (";", "{", "}"):
                    break
                j += 1
            j += 1
        if j < len(toks) and toks[j] == "(":
            out.append(i)
    return out


def scan_sites(paths=None, root: pathlib.Path = CSRC):
    """Every rendezvous call site in `paths` (default: csrc/cuda/*.cu and *.cuh)."""
    if paths is None:
        paths = sorted((root / "cuda").glob("*.cu")) + sorted((root / "cuda").glob("*.cuh"))
    units = []
    for path in paths:
        path = pathlib.Path(path)
        toks, lines = _tokens(path.read_text())
        parser = _Parser(toks)
        funcs = parser.functions()
        ranges = {f[3]: parser.loop_ranges(f[3], f[4]) for f in funcs}
        resolved = path.resolve()
        rel = resolved.relative_to(root.resolve()).as_posix() if resolved.is_relative_to(root.resolve()) else path.name
        units.append((rel, toks, lines, funcs, ranges))

    def enclosing(unit, i):
        for name, is_kernel, name_idx, lo, hi in unit[3]:
            if lo < i < hi:
                return name, is_kernel, lo
        return None

    def in_loop(unit, i, body_open):
        return any(a <= i <= b for a, b in unit[4][body_open])

    helpers = {}  # helper name -> [(unit, name_idx)]
    for unit in units:
        for name, is_kernel, name_idx, lo, hi in unit[3]:
            if not is_kernel:
                helpers.setdefault(name, []).append((unit, name_idx))

    memo: dict[str, bool] = {}

    def helper_repeats(name: str, visiting=()) -> bool:
        if name in memo:
            return memo[name]
        if name in visiting:
            return False
        result = False
        definitions = {id(u[1]): idx for u, idx in helpers.get(name, [])}
        for unit in units:
            for call in _calls(unit[1], name, definitions.get(id(unit[1]), -1)):
                where = enclosing(unit, call)
                if where is None:
                    continue
                caller, caller_is_kernel, body = where
                if in_loop(unit, call, body) or (not caller_is_kernel and helper_repeats(caller, visiting + (name,))):
                    result = True
        memo[name] = result
        return result

    sites = {}
    for unit in units:
        rel, toks, lines = unit[0], unit[1], unit[2]
        for i, t in enumerate(toks):
            if t not in RENDEZVOUS or i + 1 >= len(toks) or toks[i + 1] != "(":
                continue
            where = enclosing(unit, i)
            if where is None:
                raise ValueError(f"{rel}:{lines[i]}: {t} outside a function body")
            name, is_kernel, body = where
            loop = in_loop(unit, i, body)
            repeats = loop or (not is_kernel and helper_repeats(name))
            site = Site(rel, lines[i], t, name, is_kernel, loop, repeats)
            key = site.key
            if key in sites:  # several calls on one line: one site, repeating if any does
                old = sites[key]
                site = dataclasses.replace(old, in_loop=old.in_loop or loop, repeats=old.repeats or repeats,
                                           what=old.what if old.what == t else f"{old.what}+{t}")
            sites[key] = site
    return sorted(sites.values(), key=lambda s: (s.file, s.line))


# ---- emulator coverage ------------------------------------------------------------------------------


def csrc_relative(path: str) -> str:
    """__FILE__ as compiled (absolute, or relative to the include directory) -> relative to csrc/."""
    p = path.replace("\\", "/")
    k = p.rfind("csrc/")
    return p[k + 5 :] if k >= 0 else p


def emulator_coverage(module):
    """{"file:line": {kernel: max passes by one thread of one block}} from repkern._emu."""
    out: dict[str, dict[str, int]] = {}
    for kernel, file, line, _what, _function, passes in module.coverage():
        per_kernel = out.setdefault(f"{csrc_relative(file)}:{line}", {})
        per_kernel[kernel] = max(per_kernel.get(kernel, 0), int(passes))
    return out


def coverage_problems(sites, covered):
    """Messages for sites never reached, repeating sites never passed twice by one block, and
    sites the emulator passed that the scan does not list (a stale or broken scanner)."""
    problems = []
    for s in sites:
        kernels = covered.get(s.key, {})
        where = f"{s.key} {s.what} in {s.function}"
        if not kernels:
            problems.append(f"{where}: never reached by the emulator tests")
        elif s.repeats and max(kernels.values()) < 2:
            why = "inside a loop" if s.in_loop else "in a helper called from a loop"
            reached = ", ".join(f"{k} ({n}x)" for k, n in sorted(kernels.items()))
            problems.append(f"{where}: {why}, but no block passed it twice (reached by {reached})")
    listed = {s.key for s in sites}
    for key in sorted(covered):
        if key.startswith("cuda/") and key not in listed:
            problems.append(f"{key}: passed by the emulator but not found by the source scan (tests/emu_coverage.py)")
    return problems


# ---- pytest hooks ---------------------------------------------------------------------------------


def _is_emulator_item(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and str(callspec.params.get("backend", "")).startswith("emu"):
        return True
    return pathlib.Path(item.path).name in ("test_emulator.py", "test_emu_coverage.py")


class _State:
    def __init__(self, config):
        self.xdist = hasattr(config, "workerinput") or bool(getattr(config.option, "numprocesses", None))
        self.deselected_emu: list[str] = []
        self.failed_emu: list[str] = []
        self.missing_files: list[str] = []
        self.deselected_files: set[pathlib.Path] = set()

    def partial_reason(self):
        """None when this run is the whole emulator test set, else why it is not."""
        if self.xdist:
            return "tests run in several processes (xdist): each sees part of the emulator runs"
        if self.missing_files:
            return f"not every test file was collected ({', '.join(self.missing_files[:3])} missing)"
        if self.deselected_emu:
            return (f"{len(self.deselected_emu)} emulator tests deselected (-k/-m/--deselect/--lf), "
                    f"e.g. {self.deselected_emu[0]}")
        if self.failed_emu:
            return f"{len(self.failed_emu)} emulator tests failed, e.g. {self.failed_emu[0]}"
        return None


_state: _State | None = None


def pytest_configure(config):
    global _state
    _state = _State(config)


def pytest_unconfigure(config):
    global _state
    _state = None


def pytest_deselected(items):
    if _state is not None:
        _state.deselected_emu.extend(item.nodeid for item in items if _is_emulator_item(item))
        _state.deselected_files.update(pathlib.Path(item.path).resolve() for item in items)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """Runs after -k/-m deselection: notes missing test files, puts the coverage test last and
    resets the emulator's counts when the check will run."""
    if _state is None:
        return
    seen = {pathlib.Path(item.path).resolve() for item in items} | _state.deselected_files
    _state.missing_files = [p.name for p in sorted(TESTS.glob("test_*.py")) if p.resolve() not in seen]
    last = [item for item in items if item.nodeid.endswith(COVERAGE_TEST)]
    if not last:
        return
    items[:] = [item for item in items if item not in last] + last
    if _state.partial_reason() is None:
        from repkern import _native

        if _native.has_emulator():
            _native.emu_module().reset_coverage()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if _state is not None and report.failed and _is_emulator_item(item) and not item.nodeid.endswith(COVERAGE_TEST):
        _state.failed_emu.append(item.nodeid)
    return report


@pytest.fixture
def emu_coverage_partial():
    """None when this run is the whole emulator test set (the coverage check applies), else why not."""
    return _state.partial_reason() if _state is not None else "the emu_coverage plugin is not active"
