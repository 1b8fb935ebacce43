"""The fast path's two switches, shared by training and evaluation: bf16 autocast and the channels_last layout.

bf16 keeps fp32's exponent range, so unlike fp16 it needs no loss scaling: the weights, their gradients and the
optimizer state stay fp32 (autocast only runs the matmuls and convolutions in bf16), which keeps gradient clipping
exact. channels_last (NHWC) is the layout cuDNN's and oneDNN's fastest convolution kernels use.
"""

import torch


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for `dtype` on the device's type; a no-op context (plain fp32) when dtype is None."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def describe(dtype: torch.dtype | None, channels_last: bool, device: torch.device | None = None) -> str:
    """'bf16, channels_last' and the like: for logs and cache keys. fp32 on a GPU is said as TF32 where torch lets
    cuDNN's convolutions (or cuBLAS's matmuls) round their inputs to TF32's 10-bit mantissa, as it does by default
    for convolutions."""
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    if name == "fp32" and device is not None and device.type == "cuda" and (
            torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32):
        name = "tf32"
    return f"{name}, {'channels_last' if channels_last else 'NCHW'}"


def compiled_graphs() -> int:
    """The graphs TorchDynamo has compiled in this process (its own count)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
