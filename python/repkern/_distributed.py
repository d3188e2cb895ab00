"""The collective under every accumulator's ``all_reduce``: each rank's state packed
into one float64 vector, gathered from every rank of a torch.distributed group
(gloo on CPU, NCCL on CUDA), after checking that all ranks were configured alike.
The caller then merges the gathered states in rank order, so every rank ends with
the same state (in place for ``all_reduce``, into a temporary for ``compute(sync=True)``)."""

from __future__ import annotations

import torch
from torch import Tensor


def _initialized():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized (call init_process_group first)")
    return dist


def group_device(group=None) -> torch.device:
    """Where an accumulator that has no device yet (no data, none given) gathers: every rank must
    pass tensors the group's backend takes, and NCCL takes CUDA tensors only (the current CUDA
    device, as the ranks that hold data use); gloo and the others: the CPU."""
    dist = _initialized()
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_states(packed: Tensor, signature: Tensor, group=None) -> list[Tensor]:
    """Every rank's ``packed`` (1-D float64, lengths may differ between ranks), in rank order.

    ``signature`` (1-D float64, the same length on every rank) encodes the settings that
    must agree; a rank whose signature differs raises ``ValueError`` on every rank."""
    dist = _initialized()
    world = dist.get_world_size(group)
    header = torch.cat([signature.double(), torch.tensor([float(packed.numel())], dtype=torch.float64)]).to(
        packed.device)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=group)
    for rank, other in enumerate(headers):
        if not torch.equal(other[:-1], header[:-1]):
            raise ValueError(f"all_reduce: rank {rank} has an incompatible accumulator (different settings)")
    lengths = [int(h[-1]) for h in headers]
    longest = max(lengths)
    padded = torch.zeros(longest, dtype=torch.float64, device=packed.device)
    padded[: packed.numel()] = packed
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return [g[:length] for g, length in zip(gathered, lengths)]
