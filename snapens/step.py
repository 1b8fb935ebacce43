"""One optimizer update, as the training loop (and lr_find, and the benchmarks) make it.

Nothing here reads a value back from the device unless asked: on a GPU the host queues the next steps while the
device works, and the loop reads its sums once per log interval.
"""

import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from snapens.precision import autocast


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, momentum: float | None) -> None:
    """Write the schedule's values for this update into every parameter group (beta1 stands for momentum in Adam)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if momentum is not None:
            if "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
            else:
                group["momentum"] = momentum


def clip_gradients(model: torch.nn.Module, max_value: float, mode: str) -> None:
    """Clip the total gradient norm (mode norm) or each gradient entry (mode value) at max_value; 0 disables."""
    if max_value > 0 and mode == "norm":
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_value)
    elif max_value > 0:
        torch.nn.utils.clip_grad_value_(model.parameters(), max_value)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               grad_clip: float, clip_mode: str, precision: torch.dtype | None = None,
               skip_nonfinite: bool = False, accumulate: int = 1,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | bool]:
    """One update on one batch, with the forward pass under autocast to `precision` (None: fp32).

    With accumulate = K > 1 the batch goes forward and backward in K pieces (gradient accumulation: the memory of a
    small batch, the update of the whole one); each piece's mean loss is weighted by its share of the batch, so the
    gradient is that of the batch's mean loss. Always K pieces, so that under DDP every rank makes as many backward
    passes; gradients are all-reduced only after the last (no_sync).

    Returns the detached mean loss, the logits, the gradient norm before clipping and whether both were finite, all
    as tensors on the device: nothing is read back, so the host can queue the next steps while the device works.
    The update is made even when they are not finite, unless skip_nonfinite: then the flag is read back (one wait
    for the device per step; it is returned as a bool) and such an update is dropped, with BatchNorm's running
    statistics, which the forward pass has already moved, put back. Gradients are those of the fp32 weights, so
    clipping is the same under bf16.
    """
    buffers = [b.clone() for b in model.buffers()] if skip_nonfinite else None
    optimizer.zero_grad(set_to_none=True)
    losses, outputs = [], []
    pieces = [(xs, ys) for xs, ys in zip(x.tensor_split(accumulate), y.tensor_split(accumulate)) if len(ys)]
    for k, (xs, ys) in enumerate(pieces):
        last = k == len(pieces) - 1
        with nullcontext() if last else no_sync(model):
            with autocast(x.device, precision):  # the loss itself is computed in fp32 under autocast
                out = model(xs)
                piece = F.cross_entropy(out, ys, label_smoothing=label_smoothing) * (len(ys) / len(y))
            piece.backward()
        losses.append(piece.detach())
        outputs.append(out.detach())
    if len(pieces) == 1:  # no copies in the common case
        loss, logits = losses[0], outputs[0]
    else:
        loss, logits = torch.stack(losses).sum(), torch.cat(outputs)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    finite = torch.isfinite(loss) & torch.isfinite(norm)
    if skip_nonfinite:
        finite = bool(finite)
    if finite is False:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)
        return loss, logits, norm, finite
    if grad_clip > 0 and clip_mode == "norm":
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)  # takes parameters; reuses the norm above
    else:
        clip_gradients(model, grad_clip, clip_mode)
    optimizer.step()
    return loss, logits, norm, finite


def no_sync(model: torch.nn.Module):
    """DDP's no_sync (skip the gradient all-reduce of this backward pass); a no-op for a plain module."""
    return model.no_sync() if hasattr(model, "no_sync") else nullcontext()


def note_first_nonfinite(first: torch.Tensor, step: int, loss: torch.Tensor, norm: torch.Tensor,
                         finite: torch.Tensor) -> None:
    """Keep step, loss and gradient norm of the run's first non-finite update in `first` (float64 [3], step -1
    while there is none), on the device: it is read at the next log interval or checkpoint, not at every step."""
    found = ~finite & (first[0] < 0)
    now = torch.cat([first.new_full((1,), step), torch.stack([loss, norm]).to(first.dtype)])
    first.copy_(torch.where(found, now, first))


def seconds_since(start: float, device: torch.device) -> float:
    """Wall seconds since `start` (time.perf_counter), once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
