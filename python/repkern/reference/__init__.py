"""Pure-PyTorch implementations of every repkern op.

Readable first: these are the oracle of the tests and the baseline of the benchmarks (written the way a
careful user would, not as a strawman). Results are computed in float32 (float64 for float64 inputs) and
returned in the dtypes the fast ops use. The reference shares argument validation and a few helpers with
the fast path (:mod:`repkern._validation`, :mod:`repkern._common`) and nothing else: it imports no op, no
kernel and no native module.
"""

from repkern.reference.cka import (center_gram, cka, cka_from_grams, cka_matrix, feature_space_linear_cka, hsic,
                                   hsic_from_grams, kernel_gram, minibatch_cka)
from repkern.reference.cca import cca, pwcca, svcca
from repkern.reference.cka_test import cka_test
from repkern.reference.gram import gram, median_squared_distance, squared_distances
from repkern.reference.knn import cknna, cycle_knn, hsic_unbiased, knn, mutual_knn
from repkern.reference.rsa import rdm, rsa
from repkern.reference.sae import JumpReLU, sae_decode, sae_encode, sae_pre_activations
from repkern.reference.shape import shape_distance
from repkern.reference.similarity import similarity_matrix, similarity_test
from repkern.reference.sparsity import sparsity_feature_state, sparsity_rows, sparsity_stats

__all__ = ["JumpReLU", "cca", "center_gram", "cka", "cka_from_grams", "cka_matrix", "cka_test", "cknna", "cycle_knn",
           "feature_space_linear_cka", "gram", "hsic", "hsic_from_grams", "hsic_unbiased", "kernel_gram", "knn",
           "median_squared_distance", "minibatch_cka", "mutual_knn", "pwcca", "rdm", "rsa", "sae_decode",
           "sae_encode", "sae_pre_activations", "shape_distance", "similarity_matrix", "similarity_test",
           "sparsity_feature_state", "sparsity_rows", "sparsity_stats", "squared_distances", "svcca"]
