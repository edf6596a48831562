"""The teacher: prompts encoded as WanPipeline encodes them, and its flow-matching ODE with CFG.

generate_cache.py rolls it out over its full grid to write the cache; kd.py's eval rolls it out over the
student's K grid points (its own few-step sampling, the reference the student should beat).
"""

import torch

from flow_matching import NUM_TRAIN_TIMESTEPS, euler_step
from models import autocast, compute_dtype, load_transformer


def load_teacher(init_from, device):
    """The frozen teacher transformer: bf16 weights on GPU (it needs no fp32 master weights), eval mode."""
    return load_transformer(init_from, device, compute_dtype(device)).eval().requires_grad_(False)


def pad_embeds(embeds, length):
    """[L, D] -> [length, D], zero rows after the real tokens (what the teacher saw)."""
    return torch.cat([embeds, embeds.new_zeros(length - embeds.shape[0], embeds.shape[1])])


@torch.no_grad()
def encode_prompt(encoder, tokenizer, prompt, max_length, device):
    """[L, D] float32 CPU: UMT5 states of the prompt's real tokens, encoded as WanPipeline does.

    One prompt per call so that the result does not depend on which other prompts share a batch (rank count).
    """
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    tokens = tokenizer([prompt_clean(prompt)], padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    mask = tokens.attention_mask
    hidden = encoder(tokens.input_ids.to(device), mask.to(device)).last_hidden_state  # [1, max_length, D]
    return hidden[0, : int(mask.sum())].float().cpu()


@torch.no_grad()
def teacher_rollout(model, noise, prompt_embeds, negative_embeds, sigmas, guidance_scale, record_steps,
                    cfg_forward="batched"):
    """Euler over the teacher's sigma grid with classifier-free guidance; the kept states and x0, fp32.

    model: any module with WanTransformer3DModel's forward(hidden_states, timestep, encoder_hidden_states,
    return_dict=False) returning the velocity v = eps - x0. noise [B, C, F, H, W]; prompt_embeds,
    negative_embeds [B, L, D] (negative unused when guidance_scale == 1); sigmas [N] descending from 1 (the
    final 0 is implied); record_steps: step indices whose pre-step state is kept; cfg_forward: see
    guided_velocity. Returns [B, len(record_steps) + 1, C, F, H, W]."""
    sig = [float(s) for s in sigmas] + [0.0]
    record = set(record_steps)
    x = noise.float()
    kept = []
    for i in range(len(sigmas)):
        if i in record:
            kept.append(x)
        v = guided_velocity(model, x, sig[i] * NUM_TRAIN_TIMESTEPS, prompt_embeds, negative_embeds,
                            guidance_scale, cfg_forward)
        x = euler_step(x, v, sig[i], sig[i + 1])
    kept.append(x)
    return torch.stack(kept, dim=1)


def guided_velocity(model, x, timestep, prompt_embeds, negative_embeds, guidance_scale, cfg_forward):
    """v = uncond + g * (cond - uncond) [B, C, F, H, W] fp32 at one timestep. cfg_forward "batched": cond and
    uncond as one forward of batch 2B; "separate": two forwards of batch B (half the activation memory). The
    two agree to rounding (method.teacher_cfg_forward)."""

    def velocity(x_in, context):
        t = torch.full((x_in.shape[0],), timestep, device=x.device)
        with autocast(x.device):
            return model(x_in, t, context, return_dict=False)[0].float()

    if guidance_scale == 1:
        return velocity(x, prompt_embeds)
    if cfg_forward == "batched":
        cond, uncond = velocity(torch.cat([x, x]), torch.cat([prompt_embeds, negative_embeds])).chunk(2)
    else:
        cond, uncond = velocity(x, prompt_embeds), velocity(x, negative_embeds)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def teacher_k_step(init_from, samples, negative_embeds, sigmas, guidance_scale, device,
                   cfg_forward="batched"):
    """{index: x0 [C, F, H, W]} of the teacher's own sampling over the student's K grid points, with CFG.

    samples: {index: (initial state [1, C, F, H, W], prompt embeddings [1, L, D])}; negative_embeds [1, L, D];
    sigmas [K] the student's matched sigmas; cfg_forward as in guided_velocity. The teacher is loaded for the
    call and freed after it.
    """
    model = load_teacher(init_from, device)
    return {index: teacher_rollout(model, noise, embeds, negative_embeds, sigmas, guidance_scale, [],
                                   cfg_forward)[0, -1]
            for index, (noise, embeds) in samples.items()}
