"""How gradient checkpointing runs: each decoder block's input kept in pinned CPU memory instead of on the GPU,
and the number of blocks that checkpoint at all.

With plain checkpointing the input of every block stays on the GPU until the backward pass
recomputes the block: layers x tokens x hidden x 2 bytes (4 GiB for Llama-3-8B at 8 x 2048 tokens),
the largest share of what training needs besides the weights, and the share that grows with the
sequence. Here the block runs without autograd, its input is copied to pinned host memory on a side
stream (overlapping the next block's compute), and the backward pass copies it back, recomputes the
block with autograd (same RNG state, same autocast) and backpropagates through it.

`enable_offloaded_checkpoints(model)` wraps the model's method through which Trainer turns
checkpointing on, so that every checkpointed block uses `offloaded_checkpoint`. (transformers 5.24
and later offer `activation_checkpointing_kwargs={"offload": True}`; the releases before, the GPU
image's 5.17 among them, do not.)
It sets transformers' private `_gradient_checkpointing_func` of each block; tests/test_offload.py
checks that seam.

`checkpoint_first_blocks(model, n)` leaves checkpointing on in the first `n` decoder blocks only: the
others keep their activations for the backward pass and are not recomputed. Recomputation is about a
quarter of a checkpointed step's matrix products, so each block left out saves that share of its time
for the memory of its activations; where the memory is there, that is the trade to make.
"""

from __future__ import annotations

import functools

import torch


class _OffloadedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, hidden, *rest):
        ctx.run, ctx.rest, ctx.device = run, rest, hidden.device
        kinds = ("cpu", "cuda") if hidden.is_cuda else ("cpu",)
        ctx.autocast = {t: (torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in kinds}
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        if hidden.is_cuda:
            stream, current = _copy_stream(hidden.device), torch.cuda.current_stream(hidden.device)
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                ctx.saved = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
                ctx.saved.copy_(hidden, non_blocking=True)
                ctx.copied = torch.cuda.Event()
                ctx.copied.record(stream)
            hidden.record_stream(stream)  # its memory is not reused before the copy has read it
        else:
            ctx.saved, ctx.copied = hidden.detach().clone(), None
        return run(hidden, *rest)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.copied is not None:
            torch.cuda.current_stream(ctx.device).wait_event(ctx.copied)
        hidden = ctx.saved.to(ctx.device, non_blocking=True).requires_grad_()
        ctx.saved = None
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), _autocast(ctx.autocast):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            outputs = ctx.run(hidden, *ctx.rest)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, hidden.grad, *([None] * len(ctx.rest)))


def offloaded_checkpoint(function, hidden, *rest):
    """`function(hidden, *rest)` checkpointed with `hidden` kept in CPU memory; `rest` must need no gradient."""
    if any(torch.is_tensor(t) and t.requires_grad for t in rest):
        raise ValueError("offloaded checkpointing: only the first input of a block may require a gradient")
    return _OffloadedBlock.apply(function, hidden, *rest)


def enable_offloaded_checkpoints(model: torch.nn.Module) -> None:
    """Make every checkpointed block of `model` offload its input, whenever checkpointing is turned on (through
    `activation_checkpointing_enable`, or `gradient_checkpointing_enable` before transformers renamed it)."""

    def offload(blocks):
        for block in blocks:
            block._gradient_checkpointing_func = offloaded_checkpoint

    _when_checkpointing_is_enabled(model, "_qlr_offloaded", offload)


def checkpoint_first_blocks(model: torch.nn.Module, n: int) -> None:
    """Whenever checkpointing is turned on, keep it on in the first `n` decoder blocks of `model` only."""

    def limit(blocks):
        for block in blocks[n:]:
            block.gradient_checkpointing = False

    _when_checkpointing_is_enabled(model, "_qlr_limited", limit)


def _when_checkpointing_is_enabled(model: torch.nn.Module, marker: str, hook) -> None:
    """Wrap the methods that turn checkpointing on so that each then calls `hook(blocks)`, with the decoder blocks
    that checkpoint, in model order; `marker` keeps a second call from wrapping twice."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for method in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        original = getattr(model, method, None)
        if original is None or getattr(original, marker, False):
            continue

        @functools.wraps(original)
        def enable(*args, _original=original, **kwargs):
            _original(*args, **kwargs)
            hook([m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing])

        setattr(enable, marker, True)
        setattr(model, method, enable)


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


class _autocast:
    """Re-enter the autocast state the forward pass ran under."""

    def __init__(self, state: dict):
        self.contexts = [torch.autocast(t, dtype=dtype, enabled=on) for t, (on, dtype) in state.items()]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)
