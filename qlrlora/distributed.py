"""Learnable ranks across processes: DDP and FSDP (through accelerate, or torch's FSDP2 directly).

The ranks are one fp32 vector outside the model (adapter.Ranks), so no wrapper ever shards, casts or
flattens them: FSDP1's flat parameters need one dtype and one requires_grad per flat parameter, FSDP2
one dtype per group, and an fp32 scalar among bf16 factors would break both. Every process keeps the
whole vector; its gradient is averaged over the processes before the controller's step
(`reduce_mean`), so every process takes the same step from the same values and the ranks never drift
apart. The factors are ordinary parameters: sharded, gathered and reduced by whichever wrapper runs.

This module holds what the trainer and a plain training loop need for that: the mean over
processes, the full value of a possibly sharded parameter for saving, FSDP2 sharding of a model's
decoder blocks, and the checks that turn configurations that cannot work into one-line errors.
"""

from __future__ import annotations

import torch
from torch import nn

from qlrlora.errors import QLRError


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over all processes of the default group (itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    reduced = tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / dist.get_world_size()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter that FSDP2 may have sharded (a DTensor); a collective for a DTensor,
    so every process must call it."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def copy_full(target: torch.Tensor, value: torch.Tensor) -> None:
    """target <- value, where `value` is the whole tensor and `target` may be an FSDP2 shard (a DTensor): each
    process keeps its own part. Every process must call it with the same value."""
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements)
    target.copy_(value.to(target.dtype))


def shard_decoder_blocks(model: nn.Module, mesh=None) -> nn.Module:
    """FSDP2: every decoder block its own unit, then the root. The adapters' factors shard with their block."""
    from torch.distributed.fsdp import fully_shard

    blocks = getattr(getattr(model, "model", model), "layers", None)
    if blocks is None:
        raise QLRError(f"FSDP: {type(model).__name__} has no model.layers to shard block by block")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def check_fsdp_settings(quantize: str, dtype: str, quant_storage: str, cpu_offload: bool) -> None:
    """What FSDP needs of a recipe's model section, as one-line errors naming the field."""
    if quantize == "nf4" and quant_storage != dtype:
        raise QLRError(f"model.quant_storage: FSDP shards the packed NF4 weights together with the other weights, "
                       f"so they must be stored as the same dtype: set model.quant_storage: {dtype} (got "
                       f"{quant_storage})")
    if quantize == "nf4" and cpu_offload:
        raise QLRError("FSDP cpu offload with an NF4 model: bitsandbytes' 4-bit weights cannot be offloaded by "
                       "FSDP; turn offload off in the accelerate config or set model.quantize: none")
