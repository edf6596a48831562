"""Write the teacher's ODE trajectory cache: a numbered .safetensors file per prompt, resumable, on any ranks.

    python generate_cache.py configs/tiny.yaml
    torchrun --standalone --nproc_per_node=2 generate_cache.py configs/tiny.yaml data.num_samples=8
    torchrun --nproc_per_node=8 generate_cache.py configs/wan.yaml

Sample i is prompt i of `data.prompts`, rolled out by the teacher from noise seeded with `data.seed + i`, so
the files are the same whatever the number of ranks and however often the run was interrupted. Finished files
are checked and kept; unusable ones (truncated, wrong shape) and stray temporary files are regenerated. The
layout is described in cache_format.py.
"""

import os
import sys
import time

import torch
from tqdm import tqdm

from atomic_files import TMP_SUFFIX, make_dirs, write_json_atomic
from ar_teacher import causal_rollout, load_ar_teacher
from cache_format import (CACHE_FORMAT_VERSION, cache_fingerprint, check_cache_metadata, negative_embeds_path,
                          negative_embeds_problem, read_x0, sample_file_problem, sample_path, write_negative_embeds,
                          write_sample)
from config import CACHE_DTYPES, check_paths, config_from_argv, latent_shape, read_prompts
from distributed import (all_gather_objects, barrier, free_device_memory, init_distributed,
                         shutdown_distributed)
from errors import ConfigError, run_cli
from flow_matching import teacher_grid
from i2v import check_conditioning, image_conditioner, stored
from models import load_text_encoder
from teacher import encode_prompt, load_teacher, pad_embeds, teacher_rollout
from tiny_demo import build_missing_models


def initial_noise(shape, seed):
    """[1, C, F, H, W] float32 standard normal, drawn on the CPU so it is the same on every device."""
    return torch.randn([1, *shape], generator=torch.Generator().manual_seed(seed))


def remove_leftovers(cache_dir):
    """Temporary files of writes that never finished (a crash between write and rename)."""
    for folder in (cache_dir, os.path.join(cache_dir, "samples")):
        for name in os.listdir(folder):
            if name.endswith(TMP_SUFFIX):
                os.remove(os.path.join(folder, name))


def missing_samples(cache_dir, fingerprint, rank, world_size):
    """Sorted indices with no usable file; each rank checks (and deletes the bad of) its stride of files. A
    cache with any missing is no longer COMPLETE."""
    mine = []
    for i in range(rank, fingerprint["num_samples"], world_size):
        path = sample_path(cache_dir, i)
        if not os.path.exists(path):
            mine.append(i)
            continue
        problem = sample_file_problem(path, fingerprint, i)
        if problem is not None:
            print(f"[rank {rank}] regenerating {path}: {problem}", file=sys.stderr)
            os.remove(path)
            mine.append(i)
    missing = sorted(i for part in all_gather_objects(mine) for i in part)
    complete_marker = os.path.join(cache_dir, "COMPLETE")
    if rank == 0 and missing and os.path.exists(complete_marker):
        os.remove(complete_marker)
    return missing


def open_for_writing(cache_dir, fingerprint, rank):
    """Refuse a stale cache (on every rank, so every rank stops); on rank 0 create it, record its fingerprint
    first (so that a resume can be checked) and remove leftover temporary files."""
    check_cache_metadata(cache_dir, fingerprint)
    if rank == 0:
        make_dirs(os.path.join(cache_dir, "samples"))
        if not os.path.exists(os.path.join(cache_dir, "metadata.json")):
            write_json_atomic(os.path.join(cache_dir, "metadata.json"), fingerprint)
        remove_leftovers(cache_dir)


def mark_complete(cache_dir, paths, num_samples, rank):
    """After every rank's writes, rank 0 checks that `paths` exist and writes COMPLETE (all ranks call it)."""
    barrier()  # ranks with fewer samples wait here; nothing collective runs inside a sample loop
    if rank == 0:
        absent = [p for p in paths if not os.path.exists(p)]
        if absent:
            raise RuntimeError(f"{absent[:10]} were not written")
        write_json_atomic(os.path.join(cache_dir, "COMPLETE"), {"num_samples": num_samples})
    barrier()


def generate_cache(cfg, rank=0, world_size=1, device=torch.device("cpu")):
    """Complete cfg's trajectory cache, all ranks together (call on every rank); the number written."""
    teacher = cfg.models.teacher
    if teacher is None:
        raise ConfigError("generating the trajectory cache needs models.teacher (with init_from)")
    cache_dir = cfg.method.teacher_path_cache
    check_conditioning(cfg)
    prompts = read_prompts(cfg)
    shape = latent_shape(teacher.init_from, cfg)
    fingerprint = cache_fingerprint(cfg, prompts, shape)
    open_for_writing(cache_dir, fingerprint, rank)
    if rank == 0:
        negative = negative_embeds_path(cache_dir)
        problem = negative_embeds_problem(cache_dir) if os.path.exists(negative) else None
        if problem is not None:
            print(f"[rank 0] regenerating {negative}: {problem}", file=sys.stderr)
            os.remove(negative)
    barrier()
    missing = missing_samples(cache_dir, fingerprint, rank, world_size)
    mine = missing[rank::world_size]
    if mine or (rank == 0 and not os.path.exists(negative_embeds_path(cache_dir))):
        _write_samples(cfg, mine, prompts, fingerprint, device, rank, world_size, missing)
    mark_complete(cache_dir, [sample_path(cache_dir, i) for i in range(len(prompts))]
                  + [negative_embeds_path(cache_dir)], len(prompts), rank)
    return len(missing)


def _write_samples(cfg, indices, prompts, fingerprint, device, rank, world_size, missing):
    """Roll the teacher out for this rank's `indices` (and write the negative prompt's file on rank 0)."""
    m, dtype = cfg.method, CACHE_DTYPES[cfg.data.cache_dtype]
    max_len = cfg.pipeline.max_sequence_length
    encoder, tokenizer = load_text_encoder(cfg.models.teacher.init_from, device)
    # Round-trip through the cache dtype so the teacher is conditioned on exactly what the student will read.
    embeds = {i: encode_prompt(encoder, tokenizer, prompts[i], max_len, device).to(dtype) for i in indices}
    negative = encode_prompt(encoder, tokenizer, m.teacher_negative_prompt, max_len, device).to(dtype)
    del encoder, tokenizer
    free_device_memory(device)  # the text encoder is gone before the teacher arrives
    if rank == 0 and not os.path.exists(negative_embeds_path(m.teacher_path_cache)):  # for K-step references
        write_negative_embeds(m.teacher_path_cache, negative, m.teacher_negative_prompt)
    if not indices:
        return

    image = image_conditioner(cfg, dtype, device)  # an image-conditioned teacher's per-sample inputs (i2v.py)
    context_cache = m.context_cache  # causal ODE: an AR teacher, block by block after the clean data
    if context_cache is None:
        model, low_noise = load_teacher(cfg, device)  # frozen, replicated (no FSDP), both experts of a Wan2.2
    else:
        (model, frames_per_block), low_noise = load_ar_teacher(cfg.models.teacher.init_from, device), None
    grid = teacher_grid(cfg)
    timesteps = torch.tensor(fingerprint["timesteps"], dtype=torch.float32)
    negative_in = pad_embeds(negative, max_len).float()[None].to(device)  # [1, max_len, D]
    cache_dir = m.teacher_path_cache
    done_before = fingerprint["num_samples"] - len(missing)
    bar = tqdm(total=fingerprint["num_samples"], initial=done_before, unit="sample", disable=rank != 0,
               desc="teacher trajectories", dynamic_ncols=True)
    queues = [missing[r::world_size] for r in range(world_size)]  # every rank writes its share in this order
    written = [0] * world_size
    for i in indices:
        seed = cfg.data.seed + i
        noise = initial_noise(fingerprint["latent_shape"], seed).to(device)  # [1, C, F, H, W]
        prompt_in = pad_embeds(embeds[i], max_len).float()[None].to(device)  # [1, max_len, D]
        solver = fingerprint["teacher_solver"], fingerprint["teacher_solver_settings"]
        condition = image(i) if image is not None else None
        if context_cache is None:
            states = teacher_rollout(model, noise, prompt_in, negative_in, grid.sigmas, m.teacher_guidance_scale,
                                     grid.recorded, low_noise, m.teacher_cfg_forward, *solver,
                                     condition)  # [1, K+1, C, F, H, W]
        else:
            clean, prompt = read_x0(context_cache, i)  # [C, F, H, W]: the clean data this sample's blocks follow
            if prompt != prompts[i]:
                raise ConfigError(f"method.context_cache: {sample_path(context_cache, i)} holds the prompt "
                                  f"{prompt!r}, but sample {i} of data.prompts is {prompts[i]!r}; the context must "
                                  "be the same prompts in the same order")
            if list(clean.shape) != fingerprint["latent_shape"]:
                raise ConfigError(f"method.context_cache: {sample_path(context_cache, i)} holds latents of shape "
                                  f"{list(clean.shape)}, this cache's are {fingerprint['latent_shape']}")
            clean = clean.float()[None].to(device)
            states = causal_rollout(model, clean, noise, prompt_in, negative_in, grid.sigmas,
                                    m.teacher_guidance_scale, grid.recorded, frames_per_block, True, *solver)
            states = torch.cat([states, clean[:, None]], dim=1)  # [1, K+2, C, F, H, W]: the context last
        if not torch.isfinite(states).all():  # a diverged teacher must not leave a checksummed, poisoned file
            raise FloatingPointError(f"the teacher's trajectory for sample {i} (prompt {prompts[i]!r}) is "
                                     "not finite; nothing was written for it")
        write_sample(sample_path(cache_dir, i), states[0].to(dtype).cpu(), timesteps, embeds[i],
                     {"prompt": prompts[i], "seed": seed, "index": i, "format_version": CACHE_FORMAT_VERSION},
                     {k: v.to(dtype).cpu() for k, v in stored(condition).items()})
        # The bar counts every rank's files, so it shows the global rate and ETA: a few stats per sample on
        # rank 0, even for a huge cache on a network file system.
        if rank == 0:
            for r, queue in enumerate(queues):
                while written[r] < len(queue) and os.path.exists(sample_path(cache_dir, queue[written[r]])):
                    written[r] += 1
            bar.update(done_before + sum(written) - bar.n)
    bar.close()
    del model, low_noise, image
    free_device_memory(device)


def main(argv):
    """generate_cache.py CONFIG.yaml [key.path=value ...]: complete the cache, report size and speed."""
    cfg = config_from_argv(argv)
    build_missing_models(cfg)
    check_paths(cfg)
    rank, world_size, device = init_distributed()
    start = time.perf_counter()
    written = generate_cache(cfg, rank, world_size, device)
    elapsed = time.perf_counter() - start
    if rank == 0:
        cache_dir = cfg.method.teacher_path_cache
        size = os.path.getsize(sample_path(cache_dir, 0))
        rate = f", {elapsed / written * world_size:.2f} s per sample per rank" if written else ""
        print(f"cache {cache_dir} complete: {written} samples written in {elapsed:.1f} s on {world_size} "
              f"rank(s){rate}; {size / 2**20:.3f} MiB per sample file")
    shutdown_distributed()


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
