"""Block-by-block calibration walk (as in GPTQ's sequential quantization).

Capture the inputs of block 0; then for each block i: accumulate the Hessian of each of its
linear layers from its inputs, let the caller quantize the block, run the *quantized* block to
make the inputs of block i+1. Only one block's activations are held at a time.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

from ..models import find_linears
from .fisher import TokenWeights
from .hessian import HessianAccumulator

BlockInputs = list[tuple[tuple, dict]]  # (args, kwargs) of one block call, per calibration batch
OnBlock = Callable[[int, str, nn.Module, dict[str, torch.Tensor]], None]
Observe = Callable[[int, nn.Module, BlockInputs], None]


class _Captured(Exception):
    pass


def _model_inputs(ids: torch.Tensor, kind: str) -> dict:
    if kind == "causal-lm":
        return {"input_ids": ids, "use_cache": False}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.inference_mode()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[torch.Tensor], kind: str) -> BlockInputs:
    captured: BlockInputs = []

    def grab(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(**_model_inputs(ids, kind))
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.inference_mode()
def accumulate_hessians(root: nn.Module, prefix: str, names: set[str], run: Callable[[], None],
                        reduce: Callable[[HessianAccumulator], None] | None = None,
                        token_weights: TokenWeights | None = None) -> dict[str, torch.Tensor]:
    """Hessians of the linears of `root` whose full names are in `names`, over the inputs `run()` feeds.
    Layers fed the very same input tensor (q/k/v, gate/up) share one accumulator. `reduce(acc)`
    (data-parallel runs: `parallel.Parallel.reduce_hessian`) is applied to every accumulator, in
    name order, before the Hessians are formed. `token_weights` (`calib.fisher`): each layer's
    tokens weighted by its own loss gradients, the k-th call of `root` being calibration batch k
    (then no accumulator is shared: the weights differ per layer)."""
    linears = {n: m for n, m in find_linears(root, prefix).items() if n in names}
    accs: dict[str, HessianAccumulator] = {}
    leader_of: dict[str, str] = {}  # layer -> the layer whose accumulator it shares
    # inputs seen within one call of `root`, by weak reference: the identity test needs no copy
    # kept alive (a strong one would hold e.g. down_proj's wide input until the next batch)
    seen: list[tuple[weakref.ref, str]] = []
    calls = [-1]  # the calibration batch `root` is running

    def on_call(*_) -> None:
        seen.clear()
        calls[0] += 1

    def on_input(name: str, x: torch.Tensor) -> None:
        if token_weights is not None:
            w = token_weights[name][calls[0]]  # [batch, seq] or [batch, seq, groups]
            groups = w.shape[-1] if w.dim() == x.dim() else 1
            accs.setdefault(name, HessianAccumulator(x.shape[-1], groups)).add(x, w)
            return
        first = next((n for t, n in seen if t() is x), None)
        if first is None:
            seen.append((weakref.ref(x), name))
            first = name
        if first != name and leader_of.get(name, first) == first and name not in accs:
            leader_of[name] = first
            return
        if name in leader_of:  # shared in an earlier call but not now: cannot happen for a fixed graph
            raise RuntimeError(f"{name}: its input changed identity between calibration batches")
        accs.setdefault(name, HessianAccumulator(x.shape[-1])).add(x)

    handles = [root.register_forward_pre_hook(on_call)]
    handles += [m.register_forward_pre_hook(lambda _m, args, n=n: on_input(n, args[0])) for n, m in linears.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    if reduce is not None:
        for n in sorted(accs):
            reduce(accs[n])
    hessians: dict[str, torch.Tensor] = {}
    for n in list(accs):  # each float64 accumulator freed as soon as its Hessian is formed
        hessians[n] = accs.pop(n).hessian()
    hessians.update({n: hessians[leader] for n, leader in leader_of.items()})
    return hessians


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.inference_mode()
def walk_blocks(
    model: nn.Module,
    blocks_name: str,
    blocks: nn.ModuleList,
    batches: list[torch.Tensor],
    kind: str,
    hessian_names: set[str],
    on_block: OnBlock,
    prepare: Callable[[int, nn.Module], None] | None = None,
    release: Callable[[int, nn.Module, list[torch.Tensor] | None], None] | None = None,
    start: int = 0,
    start_hidden: list[torch.Tensor] | None = None,
    reduce: Callable[[HessianAccumulator], None] | None = None,
    observe: Observe | None = None,
    token_weights: TokenWeights | None = None,
) -> None:
    """Call `on_block(i, prefix, block, hessians)` for each block, in order, with the Hessians of
    the block's linears listed in `hessian_names`, computed from the outputs of the blocks before it
    as already quantized by earlier calls. `prepare(i, block)` runs before block i is first used
    and `release(i, block, next_hidden)` once its outputs (the next block's hidden-state inputs, one
    per batch; None after the last block) are computed (streaming: load it, then save and free it).
    `start` > 0 resumes at that block with `start_hidden` as its hidden-state inputs (the other
    inputs, masks and positions, are recaptured). `observe(i, block, inputs)` sees block i's calls
    (one per batch, on the quantized blocks' outputs) before its Hessians are taken. `token_weights`:
    loss-aware Hessians (`accumulate_hessians`)."""
    inputs = capture_block_inputs(model, blocks[0], batches, kind)
    if start:
        if start_hidden is None or len(start_hidden) != len(inputs):
            raise ValueError(f"resuming at block {start} needs the hidden states of all {len(inputs)} calibration batches")
        inputs = [with_hidden(a, k, h) for (a, k), h in zip(inputs, start_hidden)]
    for i in range(start, len(blocks)):
        block = blocks[i]
        prefix = f"{blocks_name}.{i}"
        if prepare is not None:
            prepare(i, block)

        if observe is not None:
            observe(i, block, inputs)

        def run_block() -> None:
            for args, kwargs in inputs:
                block(*args, **kwargs)

        hessians = (accumulate_hessians(block, prefix, hessian_names, run_block, reduce, token_weights)
                    if hessian_names else {})
        on_block(i, prefix, block, hessians)
        del hessians
        if i + 1 < len(blocks):
            next_inputs: BlockInputs = []
            for args, kwargs in inputs:
                out = block(*args, **kwargs)
                hidden = out[0] if isinstance(out, (tuple, list)) else out
                next_inputs.append(with_hidden(args, kwargs, hidden))
            inputs = next_inputs
        if release is not None:
            release(i, block, [hidden_of(a, k) for a, k in inputs] if i + 1 < len(blocks) else None)


@torch.inference_mode()
def whole_model_hessians(model: nn.Module, batches: list[torch.Tensor], kind: str, names: set[str],
                         reduce: Callable[[HessianAccumulator], None] | None = None,
                         token_weights: TokenWeights | None = None) -> dict[str, torch.Tensor]:
    """Fallback for models without a recognisable block list: one pass of the whole model."""

    def run() -> None:
        for ids in batches:
            model(**_model_inputs(ids, kind))

    return accumulate_hessians(model, "", names, run, reduce, token_weights)
