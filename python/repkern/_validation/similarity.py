"""Arguments of :func:`repkern.similarity_matrix` and :func:`repkern.similarity_test` (and their
references): the metric, its options (the per-pair function's keyword arguments), the layers."""

from __future__ import annotations

from repkern._validation.cca import check_cca_args, check_svcca_args, check_svcca_options
from repkern._validation.cka import check_layers
from repkern._validation.common import byte_budget, choice, generator_seed, integer
from repkern._validation.knn import KNN_METRICS, check_cknna_args, check_knn_pair_args, neighbour_count
from repkern._validation.rsa import check_rsa_args, RDM_METRICS, RSA_COMPARISONS
from repkern._validation.shape import check_shape_args, check_shape_options

SIMILARITY_METRICS = ("cka", "mutual_knn", "cycle_knn", "cknna", "shape_distance", "svcca", "pwcca", "rsa")
KNN_FAMILY = ("mutual_knn", "cycle_knn", "cknna")

REQUIRED = object()  # an option without a default (k of the kNN metrics)

# each metric's options and their defaults: the per-pair function's keyword arguments, except that the
# kNN similarity is `knn_metric` (`metric` names the alignment metric here)
OPTIONS = {
    "cka": {"kernel": "linear", "debiased": False, "sigma": None, "threshold": 1.0, "median": "full",
            "method": "auto", "max_gram_bytes": None},
    "mutual_knn": {"k": REQUIRED, "knn_metric": "cosine", "tile_bytes": None},
    "cycle_knn": {"k": REQUIRED, "knn_metric": "cosine", "tile_bytes": None},
    "cknna": {"k": REQUIRED, "tile_bytes": None},
    "shape_distance": {"alpha": 1.0, "score": "angular"},
    "svcca": {"dims": None, "keep": 0.99},
    "pwcca": {},
    "rsa": {"rdm": "correlation", "compare": "spearman"},
}
# options that set a memory budget only: the references take none of them (they change no value)
BUDGET_OPTIONS = ("tile_bytes", "method", "max_gram_bytes")
# fewest samples per metric (cknna: the unbiased HSIC divides by n(n − 3); rsa: >= 3 dissimilarities)
MIN_SAMPLES = {"cknna": 4, "rsa": 3}


def check_options(metric: str, options: dict, function: str) -> dict:
    """The metric's options with defaults filled in; TypeError naming an unknown or missing option."""
    allowed = OPTIONS[metric]
    if function == "similarity_test" and metric == "cka":  # cka_test has no method: it always holds Grams
        allowed = {key: value for key, value in allowed.items() if key != "method"}
    for key in options:
        if key not in allowed:
            known = ", ".join(allowed) or "none"
            raise TypeError(f"{key}: not an option of {function}(metric={metric!r}) (its options: {known})")
    merged = {**allowed, **options}
    for key, value in merged.items():
        if value is REQUIRED:
            raise TypeError(f"{key}: {function}(metric={metric!r}) needs the option {key}")
    return merged


def pair_options(metric: str, options: dict) -> dict:
    """The checked options as the per-pair function's keyword arguments (knn_metric -> metric)."""
    out = dict(options)
    if "knn_metric" in out:
        out["metric"] = out.pop("knn_metric")
    return out


def reference_options(options: dict) -> dict:
    """The per-pair keyword arguments the reference functions take (no memory budgets)."""
    return {key: value for key, value in options.items() if key not in BUDGET_OPTIONS}


def _check_layer_options(metric: str, options: dict, layers: list[tuple[str, object]]) -> dict:
    """Checks the options against every layer (named): sample count, widths. Returns the options."""
    name, first = layers[0]
    n = first.shape[0]
    need = MIN_SAMPLES.get(metric, 2)
    if n < need:
        raise ValueError(f"{name}: {metric} needs n >= {need} samples (rows), got n={n}")
    if metric in KNN_FAMILY:
        options["k"] = neighbour_count(options["k"], n)
        if "knn_metric" in options:
            choice("knn_metric", options["knn_metric"], KNN_METRICS)
        if options["tile_bytes"] is not None:
            byte_budget("tile_bytes", options["tile_bytes"])
    elif metric == "shape_distance":
        options["alpha"] = check_shape_options(options["alpha"], options["score"])
    elif metric == "svcca":
        dims, keep = check_svcca_options(options["dims"], options["keep"])
        if dims is not None:
            for lname, t in layers:
                if max(dims) > t.shape[1]:
                    raise ValueError(f"dims: {max(dims)} SVD directions requested from {lname}, which has only "
                                     f"d={t.shape[1]} columns")
        options["dims"], options["keep"] = dims, keep
    elif metric == "rsa":
        choice("rdm", options["rdm"], RDM_METRICS)
        choice("compare", options["compare"], RSA_COMPARISONS)
        if options["rdm"] == "correlation":
            for lname, t in layers:
                if t.shape[1] < 2:
                    raise ValueError(f"{lname}: the correlation distance between patterns (rows) needs d >= 2 "
                                     f"features, got shape {tuple(t.shape)}")
    return options


def check_similarity_matrix_args(xs, ys, metric, options: dict):
    """Validates :func:`similarity_matrix`'s arguments; returns (xs, ys or None, checked options with
    defaults). The cka options are checked by :func:`repkern.cka_matrix`."""
    choice("metric", metric, SIMILARITY_METRICS)
    options = check_options(metric, options, "similarity_matrix")
    xs = check_layers("xs", xs)
    if ys is not None:
        ys = check_layers("ys", ys, ("xs[0]", xs[0]))
    if metric != "cka":
        named = [(f"xs[{i}]", t) for i, t in enumerate(xs)] + [(f"ys[{j}]", t) for j, t in enumerate(ys or [])]
        options = _check_layer_options(metric, options, named)
    return xs, ys, options


def check_similarity_test_args(x, y, metric, n_permutations, seed, options: dict) -> dict:
    """Validates :func:`similarity_test`'s arguments (x, y and the options as the per-pair function
    checks them); returns the checked options with defaults. The cka options are checked by
    :func:`repkern.cka_test`."""
    choice("metric", metric, SIMILARITY_METRICS)
    options = check_options(metric, options, "similarity_test")
    integer("n_permutations", n_permutations, 0)
    generator_seed(seed)
    if metric in ("mutual_knn", "cycle_knn"):
        options["k"] = check_knn_pair_args(x, y, options["k"], options["knn_metric"])
    elif metric == "cknna":
        options["k"] = check_cknna_args(x, y, options["k"])
    elif metric == "shape_distance":
        options["alpha"] = check_shape_args(x, y, options["alpha"], options["score"])
    elif metric == "svcca":
        options["dims"], options["keep"] = check_svcca_args(x, y, options["dims"], options["keep"])
    elif metric == "pwcca":
        check_cca_args(x, y, "pwcca")
    elif metric == "rsa":
        check_rsa_args(x, y, options["rdm"], options["compare"])
    if metric in KNN_FAMILY and options["tile_bytes"] is not None:
        byte_budget("tile_bytes", options["tile_bytes"])
    return options
