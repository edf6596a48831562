"""The autoregressive (AR) teacher: a block-causal Wan whose trajectories a causal student can realise.

A bidirectional teacher computes every frame from the noise of all frames, later ones included; a causal student
regressing onto it is asked for a map it cannot express. An AR teacher (Causal Forcing's stage 1: the Wan model
fine-tuned block-causally by teacher forcing) generates block by block instead: for every block of frames in
order, the full grid ODE with CFG over that block's frames, its context the clean data latents of the blocks
before it (teacher forcing, as Causal Forcing generates its ODE pairs), each block at its absolute rotary
positions.

The context's per-layer keys and values are computed once per block, at timestep 0, and kept (a KV cache; the
conditional and unconditional prompts are two halves of one batch, so each keeps its own); `kv_cache=False`
runs the clean prefix again at every step instead (the reference: the same states, more compute).

An AR teacher directory is a diffusers Wan directory whose transformer/config.json records its attention pattern:
"block_causal_frames": the latent frames per block.
"""

import json
import os

import torch

from errors import ConfigError
from flow_matching import ode_solver
from models import autocast, compute_dtype, load_transformer
from wan_student import KVCache, accept_frame_timesteps, make_block_causal

AR_CONFIG_KEY = "block_causal_frames"  # in transformer/config.json: latent frames per block of an AR teacher
FIRST_FRAME_KEY = "independent_first_frame"  # and true: an image-to-video student's first frame is a block alone


def ar_frames_per_block(init_from, subfolder="transformer"):
    """The frames per block an AR teacher directory records, or None for a bidirectional one (or a hub id)."""
    path = os.path.join(init_from, subfolder, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        frames = json.load(f).get(AR_CONFIG_KEY)
    if frames is not None and (not isinstance(frames, int) or isinstance(frames, bool) or frames < 1):
        raise ConfigError(f"{path}: {AR_CONFIG_KEY} must be a positive integer (latent frames per block), "
                          f"got {frames!r}")
    return frames


def check_text_to_video(init_from):
    """ConfigError for an image-to-video causal export (its first frame a block alone) where an AR teacher is
    loaded: causal ODE generates every frame from text."""
    path = os.path.join(init_from, "transformer", "config.json")
    with open(path) as f:
        if json.load(f).get(FIRST_FRAME_KEY):
            raise ConfigError(f"{path}: {FIRST_FRAME_KEY} is set: an image-to-video student, not an AR teacher "
                              "of text-to-video causal ODE")


def load_ar_teacher(init_from, device):
    """(the frozen block-causal teacher, its frames per block); ConfigError for a bidirectional directory."""
    frames = ar_frames_per_block(init_from)
    if frames is None:
        raise ConfigError(f"{init_from} is not an AR teacher: its transformer/config.json has no "
                          f"{AR_CONFIG_KEY} (a bidirectional teacher's trajectories are not causal)")
    check_text_to_video(init_from)
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # diffusers would warn that it does not know block_causal_frames
    try:
        model = load_transformer(init_from, device, compute_dtype(device)).eval().requires_grad_(False)
    finally:
        diffusers_logging.set_verbosity(level)
    make_block_causal(model, frames)
    accept_frame_timesteps(model)
    return model, frames


def block_spans(frames, frames_per_block):
    """[(start, end)] of each block of latent frames; the last may be shorter."""
    return [(s, min(s + frames_per_block, frames)) for s in range(0, frames, frames_per_block)]


@torch.no_grad()
def causal_rollout(model, clean, noise, prompt_embeds, negative_embeds, sigmas, guidance_scale, record_steps,
                   frames_per_block, kv_cache=True, solver="euler", solver_settings=None):
    """The AR teacher's trajectory, block by block with the clean data as context; kept states and x0, fp32.

    model: a block-causal, per-frame-timestep Wan (load_ar_teacher); clean, noise [B, C, F, H, W]: the data
    latents (context) and the initial noise; clean None: free-running, each block after the teacher's own x0
    of the blocks before it (streaming, as a causal model is used); prompt_embeds, negative_embeds [B, L, D]
    (negative unused when guidance_scale == 1); sigmas [N] descending from 1; record_steps: step indices whose
    pre-step state is kept.
    Returns [B, len(record_steps) + 1, C, F, H, W]: every block's state at each kept step, then its x0.
    """
    guided = guidance_scale != 1
    embeds = torch.cat([prompt_embeds, negative_embeds]) if guided else prompt_embeds
    rows = 2 if guided else 1
    cache = KVCache() if kv_cache else None
    record = set(record_steps)

    def velocity(x, t_frames, **layout):  # x [B, C, f, H, W], t_frames [f]: v [B, C, f, H, W] with CFG
        x_in, t = x.repeat(rows, 1, 1, 1, 1), t_frames[None].expand(rows * len(x), -1)
        with autocast(x.device):
            v = model(x_in, t, embeds, return_dict=False, **layout)[0].float()
        if not guided:
            return v
        cond, uncond = v.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    blocks, context = [], []  # context: the clean latents of the blocks done, [B, C, f, H, W] each
    for start, end in block_spans(noise.shape[2], frames_per_block):
        ode, x, kept = ode_solver(solver, sigmas, solver_settings), noise[:, :, start:end].float(), []
        for i in range(len(sigmas)):
            if i in record:
                kept.append(x)
            t = torch.full((end - start,), ode.timestep(i), device=x.device)
            if kv_cache:
                v = velocity(x, t, kv_cache=cache, first_frame=start)
            else:  # the clean prefix at timestep 0, then this block
                prefix = torch.cat([*context, x], dim=2)
                v = velocity(prefix, torch.cat([t.new_zeros(start), t]))[:, :, start:]
            x = ode.step(i, x, v)
        blocks.append(torch.stack([*kept, x], dim=1))  # [B, R + 1, C, f, H, W]
        context.append(x if clean is None else clean[:, :, start:end].float())
        if kv_cache and end < noise.shape[2]:  # this block's clean latents join the context, at timestep 0
            cache.append = True
            velocity(context[-1], torch.zeros(end - start, device=x.device), kv_cache=cache, first_frame=start)
            cache.append = False
    return torch.cat(blocks, dim=3)


@torch.no_grad()
def free_running_samples(init_from, samples, negative_embeds, sigma_grids, guidance_scale, solver, solver_settings,
                         device):
    """{index: [x0 [C, F, H, W] per grid in sigma_grids]} of the AR teacher at init_from generating on its own
    (every block after its own earlier x0), from each sample's initial noise; samples: {index: (noise
    [1, C, F, H, W], prompt [1, L, D], anything)}, negative_embeds [1, L, D]. The teacher is freed after it."""
    model, frames = load_ar_teacher(init_from, device)
    return {index: [causal_rollout(model, None, noise, embeds, negative_embeds, sigmas, guidance_scale, [], frames,
                                   True, solver, solver_settings)[0, -1] for sigmas in sigma_grids]
            for index, (noise, embeds, *_) in samples.items()}
