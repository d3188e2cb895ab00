"""torch.library custom ops (namespace ``repkern``) and the public functions built on them."""
