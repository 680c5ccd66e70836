"""What the optimizer did with the clipped gradients: per-layer update norms and update / parameter ratios.

As Composer's ``OptimizerMonitor`` reports, the size of each layer's update relative to its weights is how people
judge a learning rate. Here the real update is measured, parameters after the step minus before: on recording
steps only, the parameters are copied before the step (one copy of them, the memory cost) and compared after it,
in a post-step hook of the optimizer (``Optimizer.register_step_post_hook``; Lightning has no hook after
``optimizer.step``). Non-recording steps pay nothing. The parameter norms are those the recording step's
statistics already took (no second read of the parameters). Norms are those of the full tensors under FSDP (through
the layout's reducer: one collective for the update norms).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_clip.operators import tensor_norms
from lightning_clip.params import Layout
from lightning_clip.stats import LayerIndex


@dataclass
class _Pending:
    layout: Layout
    index: LayerIndex
    before: list[Tensor]
    emit: Callable[[dict[str, float]], None]
    param_norms: Tensor | None


class UpdateMonitor:
    """Per optimizer: a snapshot of the parameters before a recording step, and the update statistics after it,
    handed to ``emit`` as ``{"update/ratio": ..., "update_norm/<layer>": ..., "update_ratio/<layer>": ...}``."""

    def __init__(self) -> None:
        self._pending: dict[int, _Pending] = {}
        self._hooks: dict[int, Any] = {}

    @torch.no_grad()
    def snapshot(
        self, optimizer: torch.optim.Optimizer, layout: Layout, index: LayerIndex, emit, param_norms: Tensor | None
    ) -> None:
        """Copy the parameters before the step; ``param_norms``, their per-tensor norms if the step's record
        already measured them (``None``: measured after the step, from the copy)."""
        key = id(optimizer)
        if key not in self._hooks:
            self._hooks[key] = optimizer.register_step_post_hook(self._after_step)
        before = [p.clone() for p in layout.local_params()]
        self._pending[key] = _Pending(layout, index, before, emit, param_norms)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        pending = self._pending.pop(id(optimizer), None)
        if pending is not None:
            pending.emit(update_stats(pending.layout, pending.index, pending.before, pending.param_norms))

    def close(self) -> None:
        """Remove the hooks and drop the snapshots (a fit ended)."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._pending.clear()


@torch.no_grad()
def update_stats(
    layout: Layout, index: LayerIndex, before: list[Tensor], param_norms: Tensor | None = None
) -> dict[str, float]:
    """Per layer, the L2 norm of the update and its ratio to the layer's parameter norm before the step, and the
    global ratio; read to the host in one transfer. ``before`` (the snapshot, not needed afterwards) becomes the
    update in place: no second copy of the parameters. ``param_norms``: the per-tensor norms of ``before`` when
    already measured (the recording step's statistics took them), which saves a read of it (and, sharded, a
    collective)."""
    if param_norms is None:
        param_norms = tensor_norms(layout, before, 2.0)
    if before:
        torch._foreach_sub_(before, layout.local_params())  # before - after: the update, negated
    update_norms = tensor_norms(layout, before, 2.0)
    layer_updates, layer_params = index.l2(update_norms), index.l2(param_norms)
    ratio = torch.linalg.vector_norm(update_norms) / torch.linalg.vector_norm(param_norms)
    layer_ratios = layer_updates / torch.where(layer_params > 0, layer_params, torch.nan)
    values = torch.cat([ratio.reshape(1), layer_updates, layer_ratios]).tolist()
    count = len(index.layers)
    metrics = {"update/ratio": values[0]}
    metrics.update({f"update_norm/{layer}": v for layer, v in zip(index.layers, values[1 : 1 + count])})
    metrics.update({f"update_ratio/{layer}": v for layer, v in zip(index.layers, values[1 + count :])})
    return metrics
