"""One optimizer update, as the training loop (and lr_find, and the benchmarks) make it.

Nothing here reads a value back from the device unless asked: on a GPU the host queues the next steps while the
device works, and the loop reads its sums once per log interval.
"""

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from snapens.precision import autocast


@dataclass(frozen=True)
class StepOptions:
    """How every update is made."""

    grad_clip: float = 0.0  # the total gradient norm (clip_mode norm) or entry (clip_mode value) to clip at; 0: off
    clip_mode: str = "norm"  # norm | value
    precision: torch.dtype | None = None  # autocast dtype of the forward pass; None: fp32
    skip_nonfinite: bool = False  # drop an update whose loss or gradient norm is not finite (a read-back per step)
    accumulate: int = 1  # pieces the batch goes forward and backward in (gradient accumulation)
    label_smoothing: float = 0.0  # of the cross-entropy (Szegedy et al. 2016, arXiv 1512.00567), in [0, 1)
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # loss(logits, inputs,
    #   labels), the batch's mean loss, handed in (snapens.teacher.DistillationLoss); None: the cross-entropy


@dataclass
class StepResult:
    """What one update leaves: tensors on the device (nothing read back), and whether it was applied."""

    loss: torch.Tensor  # the batch's detached mean loss
    logits: torch.Tensor  # detached, B x C
    grad_norm: torch.Tensor  # the total gradient norm before clipping
    finite: torch.Tensor  # loss and gradient norm both finite (bool); with skip_nonfinite, BatchNorm statistics too
    applied: bool = True  # False only when skip_nonfinite dropped the update


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, momentum: float | None) -> None:
    """Write the schedule's values for this update into every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        set_group_momentum(group, momentum)


def set_group_momentum(group: dict, momentum: float | None) -> None:
    """The momentum of a parameter group (beta1 stands for it in Adam); None leaves it as it is."""
    if momentum is None:
        return
    if "betas" in group:
        group["betas"] = (momentum, group["betas"][1])
    else:
        group["momentum"] = momentum


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               options: StepOptions = StepOptions()) -> StepResult:
    """One update on one batch, made as `options` say.

    The update is made even when loss or gradient norm are not finite, unless options.skip_nonfinite: then the flag
    is read back (one wait for the device per step) and such an update is dropped, with BatchNorm's running
    statistics, which the forward pass has already moved, put back (so are those of an update whose forward pass
    left a non-finite statistic). Gradients are those of the fp32 weights, so clipping is the same under bf16.
    """
    buffers = [b.clone() for b in model.buffers()] if options.skip_nonfinite else None
    optimizer.zero_grad(set_to_none=True)
    loss, logits = forward_backward(model, x, y, options)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    finite = torch.isfinite(loss) & torch.isfinite(norm)
    if options.skip_nonfinite:  # the forward pass may also have driven BatchNorm's statistics to inf
        finite = finite & all_finite(model.buffers())
        if torch.distributed.is_initialized():  # every rank drops the update if any must: the weights stay equal
            flag = finite.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag.bool()
    if options.skip_nonfinite and not finite:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
        return StepResult(loss, logits, norm, finite, applied=False)
    clip_gradients(params, norm, options)
    optimizer.step()
    return StepResult(loss, logits, norm, finite)


def forward_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     options: StepOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's gradients, and its detached mean loss and logits.

    With accumulate = K > 1 the batch goes forward and backward in K pieces (the memory of a small batch, the update
    of the whole one); each piece's mean loss is weighted by its share of the batch, so the gradient is that of the
    batch's mean loss. Always K pieces (fewer only when the batch has fewer images), so that under DDP every rank
    makes as many backward passes; gradients are all-reduced only after the last (no_sync).
    """
    losses, outputs = [], []
    pieces = [(xs, ys) for xs, ys in zip(x.tensor_split(options.accumulate), y.tensor_split(options.accumulate))
              if len(ys)]
    for k, (xs, ys) in enumerate(pieces):
        with nullcontext() if k == len(pieces) - 1 else no_sync(model):
            with autocast(x.device, options.precision):  # the loss itself is computed in fp32 under autocast
                out = model(xs)
                piece = loss_of(out, xs, ys, options) * (len(ys) / len(y))
            piece.backward()
        losses.append(piece.detach())
        outputs.append(out.detach())
    if len(pieces) == 1:  # no copies in the common case
        return losses[0], outputs[0]
    return torch.stack(losses).sum(), torch.cat(outputs)


def loss_of(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, options: StepOptions) -> torch.Tensor:
    """The batch's mean loss: the loss handed in, else the cross-entropy with the labels."""
    if options.loss is not None:
        return options.loss(out, x, y)
    return F.cross_entropy(out, y, label_smoothing=options.label_smoothing)


def clip_gradients(params: list[torch.nn.Parameter], norm: torch.Tensor, options: StepOptions) -> None:
    """The one clipping path: the total norm at options.grad_clip, reusing the norm already computed (mode norm),
    or each gradient entry into [-grad_clip, grad_clip] (mode value); nothing when grad_clip is 0."""
    if options.grad_clip > 0 and options.clip_mode == "norm":
        torch.nn.utils.clip_grads_with_norm_(params, options.grad_clip, norm)  # takes the parameters, not grads
    elif options.grad_clip > 0:
        torch.nn.utils.clip_grad_value_(params, options.grad_clip)


def all_finite(tensors) -> torch.Tensor:
    """Whether every floating-point tensor holds only finite values, as one bool tensor (nothing read back)."""
    flags = [t.isfinite().all() for t in tensors if t.is_floating_point()]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def nonfinite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the model's floating-point parameters and buffers that hold a NaN or an inf (one read-back)."""
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    finite = torch.stack([v.isfinite().all() for v in state.values()]).tolist()
    return [k for k, ok in zip(state, finite) if not ok]


def no_sync(model: torch.nn.Module):
    """DDP's no_sync (skip the gradient all-reduce of this backward pass); a no-op for a plain module."""
    return model.no_sync() if hasattr(model, "no_sync") else nullcontext()


def note_first_nonfinite(first: torch.Tensor, step: int, result: StepResult) -> None:
    """Keep step, loss and gradient norm of the run's first non-finite update in `first` (float64 [3], step -1
    while there is none), on the device: it is read at the next log interval or checkpoint, not at every step."""
    found = ~result.finite & (first[0] < 0)
    now = torch.cat([first.new_full((1,), step), torch.stack([result.loss, result.grad_norm]).to(first.dtype)])
    first.copy_(torch.where(found, now, first))


def seconds_since(start: float, device: torch.device) -> float:
    """Wall seconds since `start` (time.perf_counter), once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
