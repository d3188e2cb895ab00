"""Result types: sparse SAE codes, CKA plans, cka_test, similarity_test and sparsity statistics, and the saved
results of the workflows (one module per op family)."""

from repkern.results.cka import CkaPlan
from repkern.results.cka_test import CkaTestResult
from repkern.results.knn import Neighbors
from repkern.results.sae import CsrCodes, SparseCodes
from repkern.results.similarity import SimilarityTestResult
from repkern.results.sparsity import SparsityStats
from repkern.results.workflows import (AlignmentResult, CkaResult, PerturbationResult, SparsityProfile,
                                       load_result)

__all__ = ["AlignmentResult", "CkaPlan", "CkaResult", "CkaTestResult", "CsrCodes", "Neighbors", "PerturbationResult",
           "SimilarityTestResult", "SparseCodes", "SparsityProfile", "SparsityStats", "load_result"]
