"""torch.distributed set-up: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; without them, a world of one.
"""

import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist

# ranks that finish early wait this long at barriers (one teacher sample < 10 min)
TIMEOUT = timedelta(hours=2)


def init_distributed():
    """(rank, world_size, device): NCCL and cuda:LOCAL_RANK on GPU, gloo on CPU.

    Without torchrun the process is a world of one, so FSDP2 and DCP run exactly the same code.
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend, device_id = ("nccl", device) if cuda else ("gloo", None)
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=TIMEOUT, device_id=device_id)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=TIMEOUT,
                                    device_id=device_id)
    return dist.get_rank(), dist.get_world_size(), device


def barrier():
    """dist.barrier() when a process group exists."""
    if dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj):
    """[every rank's obj], in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def free_device_memory(device):
    """Collect garbage and return the freed GPU memory to the allocator's pool."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def shutdown_distributed():
    """Destroy the process group if there is one."""
    if dist.is_initialized():
        dist.destroy_process_group()
