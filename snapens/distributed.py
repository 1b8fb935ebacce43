"""Data-parallel training under torchrun or a submitit job of several tasks (DistributedDataParallel); one process
without either is unchanged.

Every rank draws the same global batch from the same seeded generator (same permutation, same augmentation) and
takes its own contiguous share of it, so the ranks need no sampler and stay in step by construction; DDP averages
the gradients, so every rank makes the same update. Rank 0 alone writes files."""

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that writes files and logs."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1


def start(device_type: str) -> Ranks:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1; else a single process. On
    CUDA the rank's GPU is made current first and named to the group (device_id), so NCCL never guesses it."""
    from_submitit()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = device_for(torch.device(device_type), ranks)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return ranks


def from_submitit() -> None:
    """A task of a submitit job of several tasks (hydra/launcher=slurm_ddp: one task per GPU over N nodes, or
    submitit's local executor), started without torchrun: its rank, world size, local rank and the rendezvous
    address (the job's first host, a port drawn from the job id) put where torchrun puts them, from submitit's job
    environment (`submitit.helpers.TorchDistributedEnvironment`, which reads SLURM's variables). Nothing when
    torchrun's variables are there or the process is not such a task."""
    if "WORLD_SIZE" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    from submitit.helpers import TorchDistributedEnvironment  # installed with the launcher that started this task

    job = TorchDistributedEnvironment()
    if job.world_size > 1:
        job.export(set_cuda_visible_devices=False)  # each rank picks its GPU by local rank (device_for)


def device_for(device: torch.device, ranks: Ranks) -> torch.device:
    """On CUDA each rank takes the GPU of its local rank among those it sees: local_rank modulo the visible count,
    so a launcher that shows each rank only its own GPU (CUDA_VISIBLE_DEVICES per rank) works too."""
    if device.type != "cuda" or not ranks.parallel:
        return device
    return torch.device("cuda", ranks.local_rank % torch.cuda.device_count())


def share(x: torch.Tensor, y: torch.Tensor, ranks: Ranks) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous part of the global batch (the parts differ by at most one image)."""
    if not ranks.parallel:
        return x, y
    return x.tensor_split(ranks.world)[ranks.rank], y.tensor_split(ranks.world)[ranks.rank]


def wrap(model: torch.nn.Module, ranks: Ranks, device: torch.device, sync_bn: bool) -> torch.nn.Module:
    """The module the loop trains through: DDP around the model (SyncBatchNorm first if asked; CUDA only) when
    parallel, the model itself otherwise. Parameters are shared, so the model's state_dict is the trained one."""
    if not ranks.parallel:
        return model
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                     else None)


def any_rank(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """True on every rank when it is true on any (a stop signal may reach the ranks at different steps)."""
    if not ranks.parallel:
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the state_dict's bytes, in key order: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def sync_buffers(model: torch.nn.Module, ranks: Ranks) -> None:
    """BatchNorm's running statistics from rank 0, as DDP takes them before every forward pass: the last pass left
    each rank with those of its own share."""
    if ranks.parallel:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def from_rank0(value: float, ranks: Ranks, device: torch.device) -> float:
    """Rank 0's value on every rank (a decision taken from it is then the same everywhere)."""
    if not ranks.parallel:
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.item()


def gather_digests(model: torch.nn.Module, ranks: Ranks) -> list[str]:
    """Every rank's weights_digest, in rank order (on every rank), after sync_buffers."""
    sync_buffers(model, ranks)
    return gather_objects(weights_digest(model), ranks)


def gather_objects(value, ranks: Ranks) -> list:
    """Every rank's `value`, in rank order (on every rank)."""
    if not ranks.parallel:
        return [value]
    out = [None] * ranks.world
    dist.all_gather_object(out, value)
    return out


def barrier(ranks: Ranks) -> None:
    if ranks.parallel:
        dist.barrier()


def stop(ranks: Ranks) -> None:
    if ranks.parallel and dist.is_initialized():
        dist.destroy_process_group()
