"""torch.nn modules: the SAE (:class:`repkern.nn.SAE`, also :class:`repkern.SAE`) with its checkpoint
loaders. The functional ops are in :mod:`repkern.ops`."""

from repkern.nn.sae import SAE

__all__ = ["SAE"]
