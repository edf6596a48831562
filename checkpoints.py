"""Training checkpoints: torch.distributed.checkpoint (DCP) folders output_dir/checkpoint-{step}/.

A checkpoint is written under checkpoint-{step}.tmp and renamed when complete, so a folder under its final
name is always complete (it holds trainer_state.pt, written last); the latest K are kept. Each folder holds
the sharded model, optimizer and, when the run keeps one, the weights' EMA (any rank count can read them),
trainer_state.pt and each rank's RNG state.
"""

import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from atomic_files import TMP_SUFFIX, make_dirs, write_atomic
from distributed import barrier
from errors import ConfigError, WriteError, one_line

# step, data position, LR scheduler; its presence marks a complete checkpoint
TRAINER_STATE = "trainer_state.pt"


def checkpoint_dirs(output_dir):
    """{step: path} of the complete checkpoints, by step (never an interrupted save's folder)."""
    found = {}
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            step = name.removeprefix("checkpoint-")
            path = os.path.join(output_dir, name)
            if step.isdigit() and os.path.exists(os.path.join(path, TRAINER_STATE)):
                found[int(step)] = path
    return dict(sorted(found.items()))


def weights_are_finite(model, device):
    """Whether every rank's shard of the model's parameters is finite (collective; one value read back, not
    one per parameter: on a GPU each read waits for the device)."""
    # DTensor shards, or plain tensors while FSDP2 holds the root unsharded (after an eval forward)
    shards = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    flag = torch.stack([torch.isfinite(shard).all() for shard in shards]).all().float().to(device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _failure(error):
    """One line for a failed checkpoint write: the first rank's own exception for a CheckpointException."""
    failures = getattr(error, "failures", None)
    if failures:
        rank, (exc, _stack) = next(iter(failures.items()))
        return f"rank {rank}: {one_line(exc)}"
    return one_line(error)


def save_checkpoint(output_dir, step, model, optimizer, trainer_state, keep, rank, device, ema=None):
    """Write checkpoint-{step} on every rank (collective), then keep only the latest `keep` complete ones.

    Non-finite weights are never saved (FloatingPointError); a failed write (disk full) removes the partial
    folder and raises WriteError."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + TMP_SUFFIX
    if not weights_are_finite(model, device):
        raise FloatingPointError(f"non-finite weights after step {step}; not saving checkpoint-{step}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        make_dirs(tmp)
    barrier()
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
    try:
        dcp.save(_state(model, optimizer, ema), checkpoint_id=tmp)
        torch.save(rng, os.path.join(tmp, f"rng-rank{rank}.pt"))
    # CheckpointException gathers every rank's failure
    except (OSError, RuntimeError, CheckpointException) as e:
        if rank == 0:  # free the space a full disk needs back; every rank's dcp.save has returned
            shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(f"writing checkpoint {tmp}: {_failure(e)}") from None
    barrier()
    if rank == 0:
        write_atomic(os.path.join(tmp, TRAINER_STATE), lambda p: torch.save(trainer_state, p))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)  # the folder appears under its final name only when complete
        for old in list(checkpoint_dirs(output_dir).values())[:-keep]:
            shutil.rmtree(old)
    barrier()


def checkpoint_to_resume(output_dir, resume, rank):
    """The checkpoint training.resume asks for (auto: the highest complete one), or None to start afresh.

    Rank 0 first removes the temporary folders of saves a crash interrupted."""
    if rank == 0 and os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith("checkpoint-") and name.endswith(TMP_SUFFIX):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    barrier()
    found = checkpoint_dirs(output_dir)
    if resume == "never":
        if found:
            raise ConfigError(f"training.output_dir {output_dir} already holds checkpoints "
                              f"{list(found.values())}; use training.resume=auto or another output_dir")
        return None
    path = found[max(found)] if found and resume == "auto" else (resume if resume != "auto" else None)
    if path is not None and not os.path.exists(os.path.join(path, TRAINER_STATE)):
        raise ConfigError(f"training.resume: {path} is not a complete checkpoint folder")
    return path


def has_ema(path):
    """Whether the checkpoint folder holds an EMA of the weights."""
    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    return any(key.startswith("ema.") for key in keys)


def load_checkpoint(path, model, optimizer, rank, device, ema=None):
    """Load model, optimizer and the EMA if given (resharded to this world) and this rank's RNG; the trainer
    state."""
    state = _state(model, optimizer, ema)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    rng_path = os.path.join(path, f"rng-rank{rank}.pt")
    if os.path.exists(rng_path):  # absent when resuming on more ranks than wrote the checkpoint
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
    return torch.load(os.path.join(path, TRAINER_STATE), weights_only=True)


def _state(model, optimizer, ema=None):
    """The DCP state dict {model, optimizer[, ema]} of an FSDP2 model, its optimizer and its EMA."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd, **({"ema": ema.state_dict()} if ema is not None else {})}
