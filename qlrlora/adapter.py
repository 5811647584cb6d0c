"""The LR-LoRA layer: a frozen linear base plus low-rank factors whose rank is learned.

    y = W0 x + s * B diag(m) A dropout(x),   m_i = sigmoid((rank - i - 0.5) / temperature)

`rank` is one fp32 scalar per layer, trained by the optimizer like the factors. The mask is
ordered: component i is on when rank > i + 0.5, so `sum(m)` tracks `rank` and pruning keeps a
prefix. `s = alpha / sqrt(r_max)` is fixed (rank-stabilised), so a component's contribution does
not change when the rank moves or when the layer is pruned.

This module knows nothing of trainers or distribution; see regularizer.py for what pushes the rank
down and trainer.py for how it is trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

try:
    from bitsandbytes.nn import Linear4bit
except ImportError:  # bitsandbytes is optional for bf16 / fp32 backbones
    Linear4bit = None


def is_linear(module: nn.Module) -> bool:
    """True for the base layers LR-LoRA can wrap: nn.Linear and bitsandbytes Linear4bit."""
    return isinstance(module, nn.Linear) or (Linear4bit is not None and isinstance(module, Linear4bit))


@dataclass
class PrunedFactors:
    """A layer cut to its hard rank. `B` already holds `scaling * mask`, so delta_W = B @ A."""

    A: torch.Tensor  # (rank, in_features)
    B: torch.Tensor  # (out_features, rank)
    dropped_share: float  # ||delta_W of the dropped components|| / ||delta_W||, Frobenius


class _MaskedLowRank(torch.autograd.Function):
    """`s * ((x A^T) * m) B^T` with `m = sigmoid((rank - offsets) / temperature)`, as one autograd node.

    Written out with torch ops this records about a dozen autograd nodes per layer (the mask's
    arithmetic, casts, two matmuls, the scaling); with 200+ adapted layers a small model's step is
    bound by launching them (docs/benchmarks/smollm2_commonsense.md). The arithmetic is the same:
    matmuls in the factors' dtype, the mask and the rank's gradient in fp32. Autocast is off inside,
    so the adapter computes in its own dtype whether or not the trainer runs under autocast.
    """

    @staticmethod
    def forward(ctx, x, A, B, rank, offsets, temperature, scaling):
        with torch.autocast(x.device.type, enabled=False):
            sig = torch.sigmoid((rank - offsets) / temperature)
            m = (sig * scaling).to(A.dtype)
            h = x @ A.t()
            ctx.save_for_backward(x, A, B, h, sig, m)
            ctx.temperature, ctx.scaling = temperature, scaling
            return (h * m) @ B.t()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, A, B, h, sig, m = ctx.saved_tensors
        need_x, need_A, need_B, need_rank = ctx.needs_input_grad[:4]
        dx = dA = dB = drank = None
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.reshape(-1, dy.shape[-1]).to(B.dtype)
            h2 = h.reshape(-1, h.shape[-1])
            dg = dy @ B
            if need_B:
                dB = dy.t() @ (h2 * m)
            dh = dg * m
            if need_A:
                dA = dh.t() @ x.reshape(-1, x.shape[-1])
            if need_x:
                dx = (dh @ A).view(x.shape)
            if need_rank:
                dm = (dg * h2).sum(0, dtype=torch.float32)
                drank = (dm * sig * (1 - sig)).sum() * (ctx.scaling / ctx.temperature)
        return dx, dA, dB, drank, None, None, None


class LRLoRALinear(nn.Module):
    """Wraps a frozen `nn.Linear` or NF4 `Linear4bit` with a learnable-rank adapter."""

    def __init__(
        self,
        base: nn.Module,
        r_max: int,
        init_rank: float,
        alpha: float,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        if not is_linear(base):
            raise TypeError(f"LR-LoRA wraps nn.Linear or bitsandbytes Linear4bit, got {type(base).__name__}")
        if r_max < 1:
            raise ValueError(f"r_max must be >= 1, got {r_max}")
        if not 0 <= init_rank <= r_max:
            raise ValueError(f"init_rank must be in [0, r_max={r_max}], got {init_rank}")
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r_max = r_max
        self.scaling = alpha / math.sqrt(r_max)
        self.temperature = 1.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        A = torch.empty(r_max, self.in_features, dtype=torch.float32, device=device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A = nn.Parameter(A.to(dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r_max, dtype=dtype, device=device))
        # Adam moves a parameter by about its learning rate per step: in bf16 a rank near 30 has a
        # resolution of 0.125, so small steps would round away. The rank is always fp32.
        self.rank = nn.Parameter(torch.tensor(float(init_rank), dtype=torch.float32, device=device))
        self.register_buffer(
            "offsets", torch.arange(r_max, dtype=torch.float32, device=device) + 0.5, persistent=False
        )
        for p in self.base.parameters():
            p.requires_grad_(False)

    def rank_mask(self) -> torch.Tensor:
        """Soft mask over the ordered components, fp32, differentiable in `rank`."""
        return torch.sigmoid((self.rank.float() - self.offsets.float()) / self.temperature)

    def effective_rank(self) -> float:
        return float(self.rank_mask().detach().sum())

    def hard_rank(self) -> int:
        """Components whose mask is >= 0.5; what pruning keeps."""
        return int((self.rank.detach().float() >= self.offsets.float()).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        delta = _MaskedLowRank.apply(
            self.dropout(x).to(self.lora_A.dtype), self.lora_A, self.lora_B, self.rank, self.offsets.float(),
            self.temperature, self.scaling,
        )
        return result + delta.to(result.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The full update s * B diag(m) A, fp32, shape (out_features, in_features)."""
        B = self.lora_B.float() * (self.rank_mask() * self.scaling)
        return B @ self.lora_A.float()

    @torch.no_grad()
    def pruned(self) -> PrunedFactors:
        """Keep the first `hard_rank()` components with scale and mask folded into B."""
        r = self.hard_rank()
        A = self.lora_A.float()
        B = self.lora_B.float() * (self.rank_mask() * self.scaling)
        # ||B A||_F^2 = sum((B^T B) * (A A^T)): r_max x r_max Gram matrices instead of a d x k product.
        gram = (B.t() @ B) * (A @ A.t())
        total = gram.sum().clamp(min=0)
        dropped = gram[r:, r:].sum().clamp(min=0) if r < self.r_max else gram.new_zeros(())
        share = float((dropped / total).sqrt()) if total > 0 else 0.0
        return PrunedFactors(A=A[:r].contiguous(), B=B[:, :r].contiguous(), dropped_share=share)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r_max={self.r_max}, "
            f"rank={float(self.rank.detach()):.2f}, scaling={self.scaling:.4g}"
        )
