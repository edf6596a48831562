"""The eval's references beside the trainer (kd.py): the teacher's own K-step sampling of the held-out samples,
and the rollout error of any samples against the teacher's cached x0."""

import torch
import torch.distributed as dist

from cache_format import read_negative_embeds
from config import CACHE_DTYPES
from i2v import image_conditions
from teacher import pad_embeds, teacher_k_step


def teacher_k_step_samples(cfg, indices, load_sample, sigmas, max_len, device):
    """{index: x0 [C, F, H, W]} of the teacher's own sampling over the student's K grid points, with CFG (and a
    Wan2.2 teacher's expert switch), from each sample's cached initial noise; load_sample(index) gives (states,
    x0, embeds) as KDTrainer loads them."""
    if not indices:
        return {}
    return teacher_k_step(cfg, *teacher_inputs(cfg, indices, load_sample, max_len, device), sigmas.double().cpu(),
                          device)


def teacher_inputs(cfg, indices, load_sample, max_len, device):
    """({index: (initial noise [1, C, F, H, W], prompt [1, L, D], context or None, image conditioning or None)},
    the negative prompt [1, max_len, D]): what the teacher samples the eval's `indices` from (i2v.py encodes the
    images of an image-conditioned teacher)."""
    negative = read_negative_embeds(cfg.method.teacher_path_cache)
    images = image_conditions(cfg, indices, CACHE_DTYPES[cfg.data.cache_dtype], device)
    samples = {}
    for index in indices:
        states, _, embeds, context = load_sample(index)
        samples[index] = (states[:1], embeds, context, images.get(index))
    return samples, pad_embeds(negative, max_len)[None].to(device).float()


def rollout_error(x0_of, indices, load_sample, rank, world_size, device, first_frame=0):
    """MSE of x0_of[index] against the teacher's cached x0 over frames first_frame.., averaged over `indices`
    (collective)."""
    total = torch.zeros((), device=device, dtype=torch.float64)
    for index in indices[rank::world_size]:
        total += (x0_of[index] - load_sample(index)[1])[:, first_frame:].pow(2).mean().double()
    dist.all_reduce(total)
    return total.item() / len(indices)
