"""Data-parallel training under ``torchrun``: the same ``aireconstruct train`` on N processes.

``torchrun --nproc_per_node=N`` sets RANK, WORLD_SIZE and LOCAL_RANK; each process then trains on
its share of the cases (a DistributedSampler over the training cases, reshuffled every epoch)
and DistributedDataParallel averages the gradients (NCCL on GPUs, Gloo on the CPU). Rank 0
validates and writes; the others wait for it. Without torchrun this is a no-op wrapper.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from .errors import AIReconstructError
from .predict import choose_device


class Distributed:
    """This process's place in a (possibly one-process) training job."""

    def __init__(self, device: str = "auto"):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = choose_device(device)
        if self.world_size > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if backend == "nccl":
                self.device = torch.device(f"cuda:{local_rank}")
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def average_gradients(self, module: torch.nn.Module) -> None:
        """Average a module's gradients over the ranks (for a module not wrapped in DDP)."""
        if self.world_size == 1:
            return
        for parameter in module.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad /= self.world_size

    def share_of(self, count: int, epoch: int, seed: int) -> list[int]:
        """The training cases this rank draws from in ``epoch``."""
        if self.world_size == 1:
            return list(range(count))
        sampler = DistributedSampler(range(count), num_replicas=self.world_size, rank=self.rank, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    def agree(self, flag: bool) -> bool:
        """Rank 0's value of ``flag`` on every rank (so that all stop at the same epoch)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.broadcast(value, src=0)
        return bool(value.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def check_in_sync(self, module: torch.nn.Module) -> None:
        """Refuse to finish if the ranks' weights differ (they must be identical under DDP)."""
        if self.world_size == 1:
            return
        total = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum().reshape(1)
        gathered = [torch.zeros_like(total) for _ in range(self.world_size)]
        dist.all_gather(gathered, total.to(self.device))
        if len({float(g.item()) for g in gathered}) != 1:
            raise AIReconstructError("The training processes' weights differ; distributed training went wrong")

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
