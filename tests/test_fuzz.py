"""Fuzzing of everything that reads outside data: the SAE checkpoint loaders (SAE.load of each format),
load_result, the accumulators' load_state_dict, and sae_decode's sparse codes.

Valid inputs are written first, then corrupted by a seeded generator: bytes truncated, flipped, overwritten
or appended; JSON keys deleted or given values of other types; tensors dropped, reshaped, retyped, emptied.
The only exceptions allowed out are ValueError, TypeError and OSError (a corrupted input may also load, if it
is still valid). A rejected load_state_dict must leave the accumulator as it was.

Budget: REPKERN_HYPOTHESIS_PROFILE=ci (default: 25 corruptions per input file, a few seconds per test) or
thorough (400). Everything runs in the crash-isolation worker (tests/isolation.py): a native crash on a
corrupted input fails the test and names the input.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random

import numpy as np
import pytest
import torch

from tests.isolation import note_case, run_isolated

ALLOWED = (ValueError, TypeError, OSError)
BUDGET = {"ci": 25, "thorough": 400}[os.environ.get("REPKERN_HYPOTHESIS_PROFILE", "ci")]


# ---- corruptions ------------------------------------------------------------------------------------------


def corrupt_bytes(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One byte-level corruption of `data`: (what, corrupted)."""
    kind = rng.choice(("truncate", "flip", "overwrite", "append", "empty", "zero-fill"))
    n = len(data)
    if kind == "truncate" and n:
        cut = rng.randrange(n)
        return f"truncated at {cut}/{n}", data[:cut]
    if kind == "flip" and n:
        out = bytearray(data)
        spots = [rng.randrange(n) for _ in range(rng.randint(1, 8))]
        for i in spots:
            out[i] ^= 1 << rng.randrange(8)
        return f"bits flipped at {sorted(spots)}", bytes(out)
    if kind == "overwrite" and n:
        start = rng.randrange(n)
        length = rng.randint(1, 64)
        junk = bytes(rng.randrange(256) for _ in range(length))
        return f"bytes {start}..{start + length} overwritten", data[:start] + junk + data[start + length:]
    if kind == "zero-fill" and n:
        start = rng.randrange(n)
        return f"zeros from {start}", data[:start] + bytes(n - start)
    if kind == "append":
        return "garbage appended", data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return "empty file", b""


def random_json_value(rng: random.Random, depth: int = 0):
    choices = [None, True, False, 0, -1, 3.9, 1e308, -0.0, "", "x", "standard", "topk", "jumprelu", "batchtopk",
               "../etc/passwd", 2**64, [], {}]
    if depth < 2:
        choices += [[random_json_value(rng, depth + 1)], {"k": random_json_value(rng, depth + 1)}]
    return rng.choice(choices)


def corrupt_json(doc, rng: random.Random):
    """One structural corruption of a JSON document (the top level or a nested object)."""
    doc = copy.deepcopy(doc)
    if not isinstance(doc, dict) or not doc or rng.random() < 0.1:
        return "document replaced", random_json_value(rng)
    target = doc
    path = []
    while True:  # descend into a nested object sometimes
        nested = [k for k, v in target.items() if isinstance(v, dict) and v]
        if not nested or rng.random() < 0.6:
            break
        key = rng.choice(nested)
        path.append(key)
        target = target[key]
    key = rng.choice(sorted(target))
    if rng.random() < 0.35:
        del target[key]
        return f"key {'/'.join(path + [key])} deleted", doc
    value = random_json_value(rng)
    target[key] = value
    return f"{'/'.join(path + [key])} = {value!r}", doc


def random_tensor(rng: random.Random, like: torch.Tensor = None) -> torch.Tensor:
    dtype = rng.choice((torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.bool,
                        torch.uint8))
    ndim = rng.choice((0, 1, 2, 3))
    if like is not None and rng.random() < 0.5:
        shape = list(like.shape)
        if shape and rng.random() < 0.7:
            shape[rng.randrange(len(shape))] += rng.choice((-1, 1, 5))
            shape = [max(0, s) for s in shape]
    else:
        shape = [rng.choice((0, 1, 2, 3, 7)) for _ in range(ndim)]
    t = torch.randn(shape, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    if rng.random() < 0.2 and t.numel():
        t.view(-1)[0] = rng.choice((math.nan, math.inf, -math.inf))
    return t.to(dtype)


def corrupt_tensors(tensors: dict, rng: random.Random):
    """One corruption of a dict of named tensors."""
    tensors = dict(tensors)
    key = rng.choice(sorted(tensors))
    kind = rng.choice(("drop", "replace", "replace", "add"))
    if kind == "drop":
        del tensors[key]
        return f"tensor {key} dropped", tensors
    if kind == "add":
        tensors["threshold" if rng.random() < 0.5 else "k"] = random_tensor(rng)
        return "tensor added", tensors
    tensors[key] = random_tensor(rng, tensors[key])
    return f"tensor {key} -> {tuple(tensors[key].shape)} {tensors[key].dtype}", tensors


def _call(fn, what: str, failures: list):
    try:
        fn()
    except ALLOWED:
        pass
    except Exception as exc:  # noqa: BLE001 - the finding
        failures.append(f"{what}: {type(exc).__name__}: {exc}"[:400])


# ---- SAE checkpoint loaders --------------------------------------------------------------------------------


def _weights(d_in=4, d_sae=6):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, generator=g),
            torch.randn(d_sae, d_in, generator=g), torch.randn(d_in, generator=g), torch.rand(d_sae, generator=g))


def write_checkpoints(root: str) -> dict:
    """One valid checkpoint folder per format (and variant): name -> (folder, format, files)."""
    from safetensors.torch import save_file

    W_enc, b_enc, W_dec, b_dec, theta = _weights()
    made = {}

    def folder(name):
        path = os.path.join(root, name)
        os.makedirs(path)
        return path

    for arch, cfg_extra, extra in (("standard", {}, {}), ("topk", {"k": 3}, {}), ("jumprelu", {}, {"threshold": theta}),
                                   ("batchtopk", {"k": 2.0}, {}), ("batchtopk", {}, {"threshold": torch.tensor(0.2)})):
        path = folder(f"saelens-{arch}-{len(extra)}")
        save_file(dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, **extra),
                  os.path.join(path, "sae_weights.safetensors"))
        with open(os.path.join(path, "cfg.json"), "w") as f:
            json.dump({"architecture": arch, "apply_b_dec_to_input": True, "normalize_activations": "none",
                       "activation_fn_kwargs": {}, **cfg_extra}, f)
        made[os.path.basename(path)] = (path, "saelens", ("cfg.json", "sae_weights.safetensors"))
    path = folder("sparsify")
    save_file({"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec},
              os.path.join(path, "sae.safetensors"))
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump({"k": 3, "activation": "topk"}, f)
    made["sparsify"] = (path, "sparsify", ("cfg.json", "sae.safetensors"))
    path = folder("gemmascope")
    np.savez(os.path.join(path, "params.npz"), W_enc=W_enc.numpy(), b_enc=b_enc.numpy(), W_dec=W_dec.numpy(),
             b_dec=b_dec.numpy(), threshold=theta.numpy())
    made["gemmascope"] = (path, "gemmascope", ("params.npz",))
    for name, state, trainer in (
            ("dl-relu", {"encoder.weight": W_enc.T, "encoder.bias": b_enc, "decoder.weight": W_dec.T, "bias": b_dec},
             None),
            ("dl-topk", {"encoder.weight": W_enc.T, "encoder.bias": b_enc, "decoder.weight": W_dec.T, "b_dec": b_dec,
                         "k": torch.tensor(3)}, {"dict_class": "AutoEncoderTopK"}),
            ("dl-batchtopk", {"encoder.weight": W_enc.T, "encoder.bias": b_enc, "decoder.weight": W_dec.T,
                              "b_dec": b_dec, "threshold": torch.tensor(0.1)}, {"dict_class": "BatchTopKSAE"})):
        path = folder(name)
        torch.save({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "ae.pt"))
        files = ("ae.pt",)
        if trainer is not None:
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump({"trainer": trainer}, f)
            files += ("config.json",)
        made[name] = (path, "dictionary_learning", files)
    return made


def _read_tensors(file: str) -> dict:
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file)
    if file.endswith(".npz"):
        with np.load(file) as params:
            return {k: torch.from_numpy(params[k]) for k in params.files}
    return torch.load(file, weights_only=True)


def _write_tensors(file: str, tensors: dict) -> None:
    if file.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, file)
    elif file.endswith(".npz"):
        with open(file, "wb") as f:
            np.savez(f, **{k: v.numpy() for k, v in tensors.items()})
    else:
        torch.save(tensors, file)


def fuzz_sae_loaders(root: str, budget: int, seed: int) -> list:
    """Corrupts each file of each checkpoint `budget` times; returns the disallowed exceptions found."""
    from repkern import SAE

    rng = random.Random(seed)
    failures = []
    for name, (path, fmt, files) in write_checkpoints(root).items():
        _call(lambda: SAE.load(path), f"{name} (valid)", failures)
        for file in files:
            full = os.path.join(path, file)
            original = open(full, "rb").read()
            for i in range(budget):
                mode = rng.random()
                if file.endswith(".json") and mode < 0.6:
                    what, doc = corrupt_json(json.loads(original), rng)
                    data = json.dumps(doc).encode()
                elif not file.endswith(".json") and mode < 0.5:
                    with open(full, "wb") as f:  # from the valid file
                        f.write(original)
                    what, tensors = corrupt_tensors(_read_tensors(full), rng)
                    _write_tensors(full, tensors)
                    data = open(full, "rb").read()
                else:
                    what, data = corrupt_bytes(original, rng)
                with open(full, "wb") as f:
                    f.write(data)
                case = f"{name}/{file} #{i}: {what}"
                note_case(case)
                _call(lambda: SAE.load(path), f"{case}, format=auto", failures)
                _call(lambda: SAE.load(path, format=fmt), f"{case}, format={fmt}", failures)
            with open(full, "wb") as f:
                f.write(original)
    return failures


def test_sae_checkpoint_loaders_raise_only_value_type_os_errors(tmp_path):
    failures = run_isolated(fuzz_sae_loaders, str(tmp_path), BUDGET, 0)
    assert not failures, f"{len(failures)} disallowed exceptions, e.g.:\n" + "\n".join(failures[:15])


# ---- load_result -----------------------------------------------------------------------------------------------


def fuzz_load_result(root: str, budget: int, seed: int) -> list:
    import repkern
    from repkern.results import AlignmentResult, CkaResult, PerturbationResult, load_result

    rng = random.Random(seed)
    failures = []
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU())
    profile = repkern.profile_sparsity(model, [torch.randn(6, 4), torch.randn(3, 4)], ["0", "1"], progress=False)
    cka = CkaResult(torch.rand(2, 3), ["a", "b"], ["x", "y", "z"], "linear", False, "exact", "mean", 10, 2)
    alignment = AlignmentResult(torch.rand(2, 3), ["a", "b"], ["x", "y", "z"], "svcca", {"dims": [2, 1], "keep": 0.99},
                                "mean", 10, 2)
    perturbation = PerturbationResult(torch.rand(2, 3, 2), ["a", "b"], [0.0, 0.1, 1.0], "mutual_knn",
                                      {"k": 3, "knn_metric": "cosine", "tile_bytes": None}, "all", 4, 10, 2)
    for name, result in (("cka", cka), ("sparsity", profile), ("alignment", alignment),
                         ("perturbation", perturbation)):
        json_path = result.save(os.path.join(root, name))
        pt_path = json_path[: -len(".json")] + ".pt"
        _call(lambda: load_result(json_path), f"{name} (valid)", failures)
        for file in (json_path, pt_path):
            original = open(file, "rb").read()
            for i in range(budget):
                mode = rng.random()
                if file.endswith(".json") and mode < 0.6:
                    what, doc = corrupt_json(json.loads(original), rng)
                    data = json.dumps(doc).encode()
                elif file.endswith(".pt") and mode < 0.5:
                    with open(file, "wb") as f:  # from the valid file
                        f.write(original)
                    what, tensors = corrupt_tensors(torch.load(pt_path, weights_only=True), rng)
                    torch.save(tensors, pt_path)
                    data = open(pt_path, "rb").read()
                else:
                    what, data = corrupt_bytes(original, rng)
                with open(file, "wb") as f:
                    f.write(data)
                case = f"{os.path.basename(file)} #{i}: {what}"
                note_case(case)
                _call(lambda: load_result(json_path), case, failures)
            with open(file, "wb") as f:
                f.write(original)
    return failures


def test_load_result_raises_only_value_type_os_errors(tmp_path):
    failures = run_isolated(fuzz_load_result, str(tmp_path), BUDGET, 1)
    assert not failures, f"{len(failures)} disallowed exceptions, e.g.:\n" + "\n".join(failures[:15])


# ---- load_state_dict ---------------------------------------------------------------------------------------------


def _accumulators():
    import repkern

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(12, 3, generator=g), torch.randn(12, 2, generator=g)]
    ys = [torch.randn(12, 4, generator=g)]
    a = torch.relu(torch.randn(10, 5, generator=g))
    return {
        "StreamingCKA": lambda: repkern.StreamingCKA().update(xs, ys),
        "StreamingCKA debiased, ys=None": lambda: repkern.StreamingCKA(debiased=True).update(xs),
        "MinibatchCKA rbf": lambda: repkern.MinibatchCKA("rbf").update(xs, ys),
        "SparsityAccumulator": lambda: repkern.SparsityAccumulator(5).update(a),
        "SparsityAccumulator keep_rows": lambda: repkern.SparsityAccumulator(5, keep_rows=True).update(a).update(a[:3]),
    }


def _corrupt_state(state, rng: random.Random):
    """A structural corruption anywhere in a (nested) state dict."""
    state = copy.copy(state)
    holder, path = state, []
    while True:
        nested = [k for k, v in holder.items() if (isinstance(v, dict) and v) or (isinstance(v, list) and v)]
        if not nested or rng.random() < 0.5:
            break
        key = rng.choice(nested)
        path.append(str(key))
        inner = holder[key]
        inner = copy.copy(inner)
        holder[key] = inner
        if isinstance(inner, list):
            index = rng.randrange(len(inner))
            path.append(str(index))
            if not isinstance(inner[index], dict):
                inner[index] = random_json_value(rng)
                return "/".join(path), state
            inner[index] = copy.copy(inner[index])
            holder = inner[index]
        else:
            holder = inner
    key = rng.choice(sorted(holder, key=str))
    path.append(str(key))
    choice = rng.random()
    if choice < 0.25:
        del holder[key]
        return f"{'/'.join(path)} deleted", state
    if choice < 0.6 and isinstance(holder[key], torch.Tensor):
        holder[key] = random_tensor(rng, holder[key])
    elif choice < 0.75:
        holder[key] = random_tensor(rng)
    else:
        holder[key] = random_json_value(rng)
    value = holder[key]
    shown = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else repr(value)[:60]
    return f"{'/'.join(path)} = {shown}", state


def _same_state(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bool((a == b).logical_or(a.isnan() & b.isnan() if a.is_floating_point() else a == b).all()))
    return a == b


def fuzz_load_state_dict(budget: int, seed: int) -> list:
    rng = random.Random(seed)
    failures = []
    for name, make in _accumulators().items():
        donor = make().state_dict()
        for i in range(budget):
            what, bad = _corrupt_state(donor, rng)
            case = f"{name} #{i}: {what}"
            note_case(case)
            target = make()
            before = target.state_dict()
            try:
                target.load_state_dict(bad)
            except ALLOWED:
                if not _same_state(target.state_dict(), before):
                    failures.append(f"{case}: rejected, but the accumulator changed")
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{case}: {type(exc).__name__}: {exc}"[:400])
            else:
                _call(target.compute, f"{case}: accepted, then compute()", failures)
        # byte-level: a corrupted torch.save of the state (what torch.load still reads goes to load_state_dict)
        import io

        buffer = io.BytesIO()
        torch.save(donor, buffer)
        original = buffer.getvalue()
        for i in range(budget):
            what, data = corrupt_bytes(original, rng)
            case = f"{name} bytes #{i}: {what}"
            note_case(case)
            try:
                loaded = torch.load(io.BytesIO(data), weights_only=True)
            except Exception:  # noqa: BLE001 - torch.load's own errors are not the target here
                continue
            _call(lambda: make().load_state_dict(loaded), case, failures)
    return failures


def test_load_state_dict_raises_only_value_type_errors_and_changes_nothing():
    failures = run_isolated(fuzz_load_state_dict, BUDGET, 2)
    assert not failures, f"{len(failures)} findings, e.g.:\n" + "\n".join(failures[:15])


# ---- sae_decode of malformed sparse codes (native gathers) ----------------------------------------------------


def fuzz_sparse_decode(budget: int, seed: int) -> list:
    """SparseCodes / CsrCodes with random, often invalid, indices and row pointers into the native gathers:
    each must decode (when valid) or raise ValueError/TypeError, never crash."""
    import repkern

    rng = random.Random(seed)
    failures = []
    d_sae, d_in = 7, 3
    W_dec = torch.randn(d_sae, d_in)
    for i in range(4 * budget):
        rows = rng.randint(0, 5)
        if rng.random() < 0.5:
            k = rng.randint(1, 4)
            idx = torch.tensor([[rng.choice((0, 1, d_sae - 1, d_sae, -1, 2**40, -(2**40)))
                                 if rng.random() < 0.2 else rng.randrange(d_sae) for _ in range(k)]
                                for _ in range(rows)], dtype=torch.int64).reshape(rows, k)
            codes = repkern.SparseCodes(torch.randn(rows, k), idx, d_sae)
        else:
            nnz = rng.randint(0, 10)
            crow = sorted(rng.randint(0, nnz) for _ in range(rows + 1))
            if crow:
                crow[0], crow[-1] = 0, nnz
            if rng.random() < 0.3 and crow:  # break the row pointers
                crow[rng.randrange(len(crow))] = rng.choice((-1, nnz + 1, 2**40, 0))
            cols = [rng.randrange(d_sae) if rng.random() > 0.2 else rng.choice((-1, d_sae, 2**40))
                    for _ in range(nnz)]
            codes = repkern.CsrCodes(torch.tensor(crow, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64),
                                     torch.randn(nnz), (rows, d_sae))
        case = f"#{i}: {codes!r}"[:600]
        note_case(case)
        _call(lambda: repkern.sae_decode(codes, W_dec), case, failures)
    return failures


@pytest.mark.parametrize("backend_name", ("cpu", "emu"))
def test_sparse_decode_of_malformed_codes(monkeypatch, backend_name):
    if backend_name == "emu":
        monkeypatch.setenv("REPKERN_BACKEND", "emu")
    else:
        monkeypatch.delenv("REPKERN_BACKEND", raising=False)
    failures = run_isolated(fuzz_sparse_decode, BUDGET, 3)
    assert not failures, f"{len(failures)} disallowed exceptions, e.g.:\n" + "\n".join(failures[:15])
