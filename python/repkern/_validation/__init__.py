"""Argument validation, in one place: every public function and :mod:`repkern.reference` call these, so
bad input gets the same ValueError/TypeError naming the argument whichever backend runs. Native code keeps
only the checks that guard memory (sizes, indices). One module per op family."""

from repkern._validation.cka import (check_cka_matrix_args, check_grams, check_hsic_args,
                                     check_layers, check_same_kind, check_sample_count, check_samples)
from repkern._validation.cka_test import check_cka_test_args
from repkern._validation.common import (FLOAT_DTYPES, boolean, byte_budget, choice, floating_tensor, integer,
                                        positive_number, same_device)
from repkern._validation.gram import GRAM_KERNELS, MAX_THRESHOLD, MEDIANS, check_gram_args, rbf_threshold
from repkern._validation.sae import (SAE_ACTIVATIONS, SAE_OUTPUTS, check_sae_decode_args, check_sae_encode_args,
                                     threshold_tensor)
from repkern._validation.sparsity import check_sparsity_args
from repkern._validation.state import (STATE_FORMAT_VERSION, check_state_dict, same_setting, state_bool, state_count,
                                       state_tensor, state_widths)

__all__ = ["FLOAT_DTYPES", "GRAM_KERNELS", "MAX_THRESHOLD", "MEDIANS", "SAE_ACTIVATIONS", "SAE_OUTPUTS",
           "STATE_FORMAT_VERSION", "boolean", "byte_budget", "check_cka_matrix_args", "check_cka_test_args",
           "check_gram_args", "check_grams", "check_hsic_args", "check_layers", "check_sae_decode_args",
           "check_sae_encode_args", "check_same_kind", "check_sample_count", "check_samples", "check_sparsity_args",
           "check_state_dict", "choice", "floating_tensor", "integer", "positive_number", "rbf_threshold", "same_device",
           "same_setting", "state_bool", "state_count", "state_tensor", "state_widths", "threshold_tensor"]
