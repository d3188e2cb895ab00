"""repkern: fast kernels for representation analysis on PyTorch tensors.

Public API (see README): :func:`gram`; :func:`hsic`, :func:`cka`, :func:`cka_from_grams`,
:func:`cka_matrix`, :func:`cka_plan`;
:class:`StreamingCKA`, :class:`MinibatchCKA`; :func:`cka_test` (:class:`CkaTestResult`); :func:`sparsity_stats`, :class:`SparsityAccumulator`;
:func:`sae_encode`, :func:`sae_decode` (:class:`SparseCodes`, :class:`CsrCodes`), :class:`SAE`
(with checkpoint loaders);
:func:`capture`, :func:`compare_models`, :func:`perturbation_sensitivity`, :func:`profile_sparsity`
(:class:`CkaResult`, :class:`AlignmentResult`, :class:`PerturbationResult`, :class:`SparsityProfile`,
:func:`load_result`); :func:`build_info`; pure-PyTorch twins of
every op in :mod:`repkern.reference`.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from repkern import reference  # noqa: F401
from repkern._native import has_emulator as _has_emulator
from repkern.capture import capture
from repkern.nn import SAE
from repkern.ops.cca import cca, pwcca, svcca
from repkern.ops.cka import cka, cka_from_grams, cka_matrix, cka_plan, hsic
from repkern.ops.cka_test import cka_test
from repkern.ops.gram import gram
from repkern.ops.knn import cknna, cycle_knn, knn, mutual_knn
from repkern.ops.rsa import rdm, rsa
from repkern.ops.sae import sae_decode, sae_encode
from repkern.ops.shape import shape_distance
from repkern.ops.similarity import similarity_matrix, similarity_test
from repkern.ops.sparsity import SparsityAccumulator, sparsity_stats
from repkern.ops.streaming import MinibatchCKA, StreamingCKA
from repkern.ops.streaming_alignment import StreamingAlignment
from repkern.results import (AlignmentResult, CkaPlan, CkaResult, CkaTestResult, CsrCodes, Neighbors, PerturbationResult,
                             SimilarityTestResult, SparseCodes, SparsityProfile, SparsityStats, load_result)
from repkern.workflows import compare_models, perturbation_sensitivity, profile_sparsity

try:
    __version__ = _metadata.version("repkern")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"


def _warn_if_built_without_cuda() -> None:
    """A GPU is here but the build skipped CUDA (pip hides the build's own warning unless run with -v)."""
    from repkern import _C

    reason = _C.build_info()["cuda_skipped"]
    if reason:
        import torch

        if torch.cuda.is_available():
            import warnings

            warnings.warn(f"repkern was built without CUDA kernels ({reason}): CUDA tensors will raise. Reinstall "
                          "with nvcc on PATH and REPKERN_CUDA=ON.", RuntimeWarning, stacklevel=2)


_warn_if_built_without_cuda()


def build_info() -> dict:
    """How this installation was built and what it can run on."""
    import torch

    from repkern import _C

    info = dict(_C.build_info())
    info["version"] = __version__
    info["emulator"] = _has_emulator()
    info["torch"] = torch.__version__
    info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


__all__ = ["gram", "hsic", "cka", "cka_from_grams", "cka_matrix", "cka_plan", "CkaPlan", "StreamingCKA",
           "MinibatchCKA", "cka_test", "CkaTestResult", "sparsity_stats",
           "SparsityAccumulator", "SparsityStats", "sae_encode", "sae_decode", "SAE", "SparseCodes", "CsrCodes",
           "capture", "compare_models", "perturbation_sensitivity", "profile_sparsity", "CkaResult", "AlignmentResult",
           "PerturbationResult", "SparsityProfile", "load_result",
           "knn", "Neighbors", "mutual_knn", "cycle_knn", "cknna", "shape_distance", "cca", "svcca", "pwcca", "rdm",
           "rsa", "StreamingAlignment", "similarity_matrix", "similarity_test", "SimilarityTestResult",
           "build_info", "reference", "__version__"]
