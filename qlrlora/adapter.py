"""The LR-LoRA layer: a frozen linear base plus low-rank factors whose rank is learned.

    y = W0 x + s * B diag(m) A dropout(x),   m_i = 1 if rank > i + 0.5 else 0

Every adapted layer has one continuous rank. The ranks of all layers of a model live in one fp32
vector, `Ranks`, the single owner of everything rank: the values, the mask, the hard rank, the
clamp and the temperature. A layer holds its factors and reads its entry of that vector. The mask
is ordered, so pruning keeps a prefix of components, and `s = alpha / sqrt(r_max)` is fixed
(rank-stabilised), so a component's contribution does not change when the rank moves.

The forward pass uses the hard mask: the adapter that trains is exactly the adapter that is
exported, and no factor can make up for a half-open mask by growing (with a soft mask it did, and
the rank stopped meaning anything). The rank's gradient is the straight-through one of the soft
mask sigmoid((rank - i - 0.5) / temperature): the components within about one temperature of the
boundary tell the rank whether switching them on or off lowers the loss. A component that is
switched off keeps the factors it had, so "switch it back on" stays a meaningful question.

The rank vector is deliberately not a parameter of the model: the trainer's optimizer, gradient
clipping, DDP and FSDP never see it (FSDP's flat parameters need one dtype; an fp32 scalar among
bf16 factors breaks that), and the rank controller (regularizer.py) updates it from its gradient.

This module knows nothing of trainers or distribution; regularizer.py decides how the ranks move,
trainer.py when.
"""

from __future__ import annotations

import functools
import math

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


# While a rank learns, the forward pass computes the components up to this many temperatures past its
# boundary; the soft mask's derivative further out is under 5e-7 of its peak. At 8 temperatures (1.4e-3) the
# planted-rank tests already ended one rank off: near convergence the far components' pull is what is left.
WINDOW = 16.0


class Ranks:
    """The continuous rank of every adapted layer of a model, as one fp32 vector, and its mask.

    `values` is a leaf tensor with `requires_grad`: the layers' forward passes read it, so after a
    backward pass `values.grad` holds the task's gradient for every rank at once.
    """

    def __init__(self, r_max: list[int], init: list[float], device=None, temperature: float = 1.0):
        if len(r_max) != len(init) or not r_max:
            raise ValueError("Ranks needs one r_max and one initial rank per layer")
        for r, rank in zip(r_max, init):
            if r < 1:
                raise ValueError(f"r_max must be >= 1, got {r}")
            if not 0 <= rank <= r:
                raise ValueError(f"init_rank must be in [0, r_max={r}], got {rank}")
        # Rank steps are ~1e-2: in bf16 a rank near 30 has a resolution of 0.125, so they would round away.
        self.values = torch.tensor(init, dtype=torch.float32, device=device).requires_grad_()
        self.r_max = torch.tensor(r_max, dtype=torch.float32, device=device)
        self.offsets = torch.arange(max(r_max), dtype=torch.float32, device=device) + 0.5
        self.exists = self.offsets[None, :] < self.r_max[:, None]
        # Width, in components, of the window around the boundary whose components give the rank its gradient.
        self.temperature = temperature
        # Whether the ranks still move: the forward pass then computes what their gradient needs. The rank
        # controller turns it off once the ranks are frozen (or fixed from the start).
        self.learning = True
        self._r_max_list = list(r_max)
        self._cache_key = None
        self._hard_list: list[int] = []
        self._slope: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.values.numel()

    @property
    def device(self) -> torch.device:
        return self.values.device

    def hard(self) -> torch.Tensor:
        """Components switched on per layer: round(rank) within [0, r_max]; what the forward uses and export keeps."""
        with torch.no_grad():
            return ((self.values[:, None] >= self.offsets) & self.exists).sum(dim=1)

    def window(self, index: int) -> tuple[int, int, torch.Tensor | None]:
        """What one layer's forward pass computes: (hard rank k, components computed kk, rank-gradient slope).

        Without a rank gradient to compute (ranks not learning, or no autograd) kk = k and the slope is
        None. Otherwise kk reaches WINDOW temperatures past the boundary, and the slope (fp32, kk values) is
        the derivative of sigmoid((rank - offsets) / temperature) with respect to the rank. Hard ranks and
        slopes are computed for all layers at once, when the ranks changed (one host sync), not per call."""
        self._refresh()
        k, r_max = self._hard_list[index], self._r_max_list[index]
        if not (self.learning and self.values.requires_grad and torch.is_grad_enabled()):
            return k, k, None
        kk = min(r_max, k + math.ceil(WINDOW * self.temperature))
        return k, kk, self._slope[index, :kk]

    def _refresh(self) -> None:
        key = (id(self.values), self.values._version, self.temperature)  # _version: bumped by every in-place write
        if key == self._cache_key:
            return
        with torch.no_grad():
            self._hard_list = self.hard().tolist()
            soft = torch.sigmoid((self.values[:, None] - self.offsets) / self.temperature)
            self._slope = soft * (1 - soft) / self.temperature
        self._cache_key = key

    def layer_mask(self, index: int) -> torch.Tensor:
        """The 0/1 mask of one layer's components, fp32."""
        r = int(self.r_max[index])
        with torch.no_grad():
            return (self.values[index] >= self.offsets[:r]).float()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.values.copy_(torch.minimum(self.values.clamp(min=0.0), self.r_max))

    @torch.no_grad()
    def snap_(self) -> None:
        """Set every rank to its hard rank (the forward pass does not change)."""
        self.values.copy_(self.hard().float())


@functools.cache
def _dropout_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device)


def _dropout_seed() -> int:
    """A seed for one dropout mask, drawn from the CPU's global generator: gradient checkpointing restores that
    generator's state before it recomputes a block, so the recomputation draws the same seed, hence the same mask."""
    return int(torch.randint(1 << 62, (1,)))


def _redraws(device: torch.device) -> bool:
    """Whether the backward pass draws a dropout mask again instead of keeping it: on a GPU, where drawing it (Philox)
    is one more pass over memory, yes; on a CPU, where drawing them again slowed the bench's step by about a fifth
    (docs/benchmarks/throughput.md), no: the mask is kept, a byte per entry."""
    return device.type == "cuda"


def _kept(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Which entries of `x` dropout with probability `p` keeps (bool), drawn from `seed` alone, so that the backward
    pass can draw the same mask again (`_redraws`)."""
    generator = _dropout_generator(x.device)
    generator.manual_seed(seed)
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p, generator=generator)


class _LowRankUpdate(torch.autograd.Function):
    """`result + s * (d(x) A[:k]^T) B[:, :k]^T`, the base output plus the first `k` components of the branch fed by
    dropout `d`, as one autograd node.

    The mask is a prefix, so the forward pass computes only the live components (`k`, the hard rank)
    and adds them to the base output in one matrix product (`addmm`, the scale as its alpha): no mask
    is multiplied in, no component past the rank costs a FLOP. Written out with torch ops the branch
    recorded about a dozen autograd nodes per layer; with 200+ adapted layers a small model's step is
    bound by launching them (docs/benchmarks/smollm2_commonsense.md).

    While the rank learns, `x A^T` is computed for `kk >= k` components, and the rank's gradient is
    the straight-through one of the soft mask sigmoid((rank - offsets) / temperature) over those
    components: `slope` holds that sigmoid's derivative for each of them (`Ranks.window`). The
    components past `kk` are more than `Ranks.window` temperatures past the boundary; their share of
    the gradient is left out (the sigmoid's derivative there is under 5e-7 of its peak). The
    gradient is added straight into the rank vector's `.grad` at `index`, not routed through
    autograd (that cost an indexing node per layer and its backward). Matmuls run in the factors'
    dtype, the rank's gradient in fp32; autocast is off inside, so the adapter computes in its own
    dtype whether or not the trainer runs under autocast.

    Dropout (probability `p`, its mask drawn from `seed`) happens inside: the node keeps `x` itself,
    which the other layers that read it (q, k and v; gate and up) keep too, and on a GPU draws the
    mask again in the backward pass (on a CPU it keeps the mask, a byte per entry: `_redraws`).
    Dropout as a module of its own keeps, in every adapted layer, the dropped copy of its input and
    the mask (at the 8B block shape on a CPU, the stock stack's block keeps 295,784 bytes per token,
    ours 224,104: docs/benchmarks/throughput.md). The kept entries are scaled by 1 / (1 - p) through
    the products' alpha, not by a pass of their own.
    """

    @staticmethod
    def forward(ctx, result, x, A, B, k, kk, slope, scaling, ranks, index, p=0.0, seed=0):
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            kept = None
            if p:
                kept = _kept(x2, p, seed)
                h = _scaled_mm((x2 * kept).to(A.dtype), A[:kk].t(), 1 / (1 - p))
            else:
                h = x2.to(A.dtype) @ A[:kk].t()
            flat = result.reshape(-1, result.shape[-1])
            if flat.dtype == A.dtype:
                out = torch.addmm(flat, h[:, :k], B[:, :k].t(), alpha=scaling)
            else:
                out = flat + _scaled_mm(h[:, :k], B[:, :k].t(), scaling).to(flat.dtype)
            ctx.save_for_backward(x, A, B, h, slope, None if kept is None or _redraws(x.device) else kept)
            ctx.k, ctx.scaling, ctx.ranks, ctx.index, ctx.p, ctx.seed = k, scaling, ranks, index, p, seed
            return out.view(result.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, A, B, h, slope, kept = ctx.saved_tensors
        k, kk, s, p = ctx.k, h.shape[-1], ctx.scaling, ctx.p
        need_result, need_x, need_A, need_B = ctx.needs_input_grad[:4]
        dx = dA = dB = None
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(B.dtype)
            x2 = x.reshape(-1, x.shape[-1])
            if p and kept is None and (need_A or need_x):
                kept = _kept(x2, p, ctx.seed)
            dg = dy2 @ B[:, :kk]  # unscaled; every product below takes the scale as its alpha
            if need_B:
                dB = torch.zeros_like(B) if k < B.shape[1] else torch.empty_like(B)
                _scaled_mm(dy2.t(), h[:, :k], s, out=dB[:, :k])
            if need_A:
                dA = torch.zeros_like(A) if k < A.shape[0] else torch.empty_like(A)
                dropped = x2 if kept is None else kept * x2
                _scaled_mm(dg[:, :k].t(), dropped.to(A.dtype), s / (1 - p), out=dA[:k])
            if need_x:
                dx = _scaled_mm(dg[:, :k], A[:k], s / (1 - p)).to(x.dtype)
                if kept is not None:
                    dx.mul_(kept)
                dx = dx.view(x.shape)
            if slope is not None:
                values = ctx.ranks.values
                if values.grad is None:
                    values.grad = torch.zeros_like(values)
                dm = (dg.float() * h.float()).sum(0)
                values.grad.narrow(0, ctx.index, 1).addmv_(dm[None], slope, alpha=s)
        return dy if need_result else None, dx, dA, dB, None, None, None, None, None, None, None, None


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, alpha: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """`alpha * a @ b` in one matrix product (beta = 0: the first argument of addmm is ignored)."""
    if out is None:
        return torch.addmm(a.new_empty(1), a, b, beta=0, alpha=alpha)
    return torch.addmm(out, a, b, beta=0, alpha=alpha, out=out)


def _resized(t: torch.Tensor, n: int, dim: int, grown: torch.Tensor | None) -> torch.Tensor:
    """`t` with `n` entries along `dim`: its first `n`, or all of it followed by `grown` (zeros when None)."""
    held = t.shape[dim]
    if n <= held:
        return t.narrow(dim, 0, n).clone()
    if grown is None:
        shape = list(t.shape)
        shape[dim] = n - held
        grown = t.new_zeros(shape)
    return torch.cat([t, grown], dim=dim)


class LRLoRALinear(nn.Module):
    """Wraps a frozen `nn.Linear` or NF4 `Linear4bit` with a learnable-rank adapter.

    `ranks` / `index`: the model's rank vector and this layer's entry in it (model.py makes one for
    all layers); without them the layer owns a vector of its own, starting at `init_rank` (default
    r_max), for use on its own.
    """

    def __init__(
        self,
        base: nn.Module,
        r_max: int,
        alpha: float,
        init_rank: float | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.bfloat16,
        ranks: Ranks | None = None,
        index: int = 0,
    ):
        super().__init__()
        if not is_linear(base):
            raise TypeError(f"LR-LoRA wraps nn.Linear or bitsandbytes Linear4bit, got {type(base).__name__}")
        device = base.weight.device
        if ranks is None:
            ranks, index = Ranks([r_max], [r_max if init_rank is None else init_rank], device=device), 0
        elif int(ranks.r_max[index]) != r_max:
            raise ValueError(f"ranks[{index}] has r_max {int(ranks.r_max[index])}, the layer {r_max}")
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r_max = r_max
        self.ranks = ranks
        self.index = index
        self.scaling = alpha / math.sqrt(r_max)
        self.dropout = dropout
        A = torch.empty(r_max, self.in_features, dtype=torch.float32, device=device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A = nn.Parameter(A.to(dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r_max, dtype=dtype, device=device))
        for p in self.base.parameters():
            p.requires_grad_(False)

    @property
    def rank(self) -> torch.Tensor:
        """This layer's continuous rank: a differentiable view into the model's rank vector."""
        return self.ranks.values[self.index]

    def rank_mask(self) -> torch.Tensor:
        """The 0/1 mask over the components the factors hold, fp32."""
        return self.ranks.layer_mask(self.index)[: self.components]

    @property
    def components(self) -> int:
        """How many components the factors hold: r_max, unless `resize_` cut them to a frozen rank."""
        return self.lora_A.shape[0]

    @torch.no_grad()
    def resize_(self, n: int) -> None:
        """Make the factors hold `n` components, in place: cut them to their first `n`, or grow them back to
        at most r_max with fresh components (A drawn as at construction, B zero: they add nothing). Their
        gradients, if any, are cut or zero-padded alike.

        Cutting to the hard rank leaves the forward pass as it was and stops the step from storing,
        zero-filling and updating components that can no longer switch on; the caller keeps the rank
        within `n`. The parameters stay the same Python objects (`torch.utils.swap_tensors`, which also
        drops the autograd state sized for the old shape), so an optimizer keeps them; its state is the
        caller's to cut alike."""
        if not 0 <= n <= self.r_max:
            raise ValueError(f"LR-LoRA layer {self.index}: expected 0 <= components <= r_max={self.r_max}, got {n}")
        held = self.components
        if n == held:
            return
        fresh = None
        if n > held:
            fresh = torch.empty(n - held, self.in_features, dtype=torch.float32, device=self.lora_A.device)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
            fresh = fresh.to(self.lora_A.dtype)
        for param, dim, grown in ((self.lora_A, 0, fresh), (self.lora_B, 1, None)):
            resized = nn.Parameter(_resized(param.data, n, dim, grown), requires_grad=param.requires_grad)
            if param.grad is not None:
                resized.grad = _resized(param.grad, n, dim, None)
            torch.utils.swap_tensors(param, resized)

    @torch.no_grad()
    def order_components_(self, k: int, state: dict | None = None) -> None:
        """Sort the first `k` components (those switched on), largest first by |s b_i| |a_i|, the size of the
        rank-one update each adds, so that the last one switched on, the one the rank's gradient weighs and
        pruning cuts, is the layer's smallest. The forward pass computes the same sum in another order.

        `state` is the optimizer's state of the factors ({param: {name: tensor}}): tensors of a factor's shape
        (AdamW's moments) are permuted alike, so the next step is the permuted step."""
        if k < 2:
            return
        A, B = self.lora_A, self.lora_B
        size = B[:, :k].float().norm(dim=0) * A[:k].float().norm(dim=1)
        order = torch.argsort(size, descending=True, stable=True)
        for param, dim in ((A, 0), (B, 1)):
            held = [param.data, *(v for v in (state or {}).get(param, {}).values()
                                  if torch.is_tensor(v) and v.shape == param.shape)]
            for tensor in held:
                head = tensor.narrow(dim, 0, k)
                head.copy_(head.index_select(dim, order))

    def hard_rank(self) -> int:
        """Components switched on: what the forward pass uses and pruning keeps."""
        return int(self.ranks.hard()[self.index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        k, kk, slope = self.ranks.window(self.index)
        if kk == 0:
            return result
        if kk > self.lora_A.shape[0]:
            raise RuntimeError(
                f"LR-LoRA layer {self.index}: the factors hold {self.lora_A.shape[0]} components and the forward "
                f"pass needs {kk}; cut factors are for frozen ranks (resize_ grows them back)")
        p = self.dropout if self.training else 0.0
        return _LowRankUpdate.apply(
            result, x, self.lora_A, self.lora_B, k, kk, slope, self.scaling, self.ranks, self.index, p,
            _dropout_seed() if p else 0,
        )

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The update s * B diag(m) A that the forward pass adds, fp32, shape (out_features, in_features)."""
        B = self.lora_B.float() * (self.rank_mask() * self.scaling)
        return B @ self.lora_A.float()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r_max={self.r_max}, "
            f"components={self.components}, rank={float(self.rank.detach()):.2f}, scaling={self.scaling:.4g}, "
            f"dropout={self.dropout:g}"
        )
