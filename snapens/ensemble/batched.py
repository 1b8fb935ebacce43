"""M snapshots of one architecture evaluated in one pass: `torch.func.stack_module_state` stacks their weights and
BatchNorm statistics, and `vmap` over `functional_call` runs the architecture once for all of them (eval mode, so
each member normalises with its own running statistics). Equal to the one-at-a-time passes within float rounding.

Whether it is faster depends on the device: on our 2-core CPU it was slower (scripts/bench_ensemble.py,
docs/benchmarks.md), so the tools use it only when asked (`batched=true`, `distill.batched=true`).
"""

import copy
import json
import warnings

import torch
from torch.func import functional_call, stack_module_state, vmap

from snapens.batches import eval_batches
from snapens.data import Split
from snapens.precision import autocast, layout


def same_architecture(models: list[torch.nn.Module]) -> bool:
    """Whether the models share one state_dict layout (names, shapes, dtypes) and class: what stacking needs."""
    def layout(model: torch.nn.Module) -> str:
        return json.dumps([type(model).__qualname__] + [[k, list(v.shape), str(v.dtype)]
                                                        for k, v in model.state_dict().items()])
    return len({layout(m) for m in models}) == 1


class StackedMembers:
    """`members(x)`: M x N x C logits of the M models (same architecture, in eval mode) on one batch x."""

    def __init__(self, models: list[torch.nn.Module]):
        if not same_architecture(models):
            raise ValueError("batched members must share one architecture (the same state_dict layout)")
        for model in models:
            model.eval()
        self.params, self.buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")  # the architecture only: its weights come from the stacks

        def one(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
            return functional_call(base, (params, buffers), (x,))

        self.forward = vmap(one, in_dims=(0, 0, None))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # vmap's note that adaptive_avg_pool2d takes its slower, generic path
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            return self.forward(self.params, self.buffers, x)


@torch.no_grad()
def stacked_logits(models: list[torch.nn.Module], split: Split, mean, std, batch_size: int, device: torch.device,
                   precision: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
    """float32 M x N x C logits of the models on every image of the split, in one vmapped pass per batch: what
    `predict_logits` gives model by model."""
    members = StackedMembers([m.to(device, memory_format=layout(channels_last)) for m in models])
    with autocast(device, precision):
        out = [members(x).float() for x, _ in eval_batches(split, batch_size, mean, std, device, channels_last)]
    return torch.cat(out, 1).cpu()
