"""The teacher: prompts encoded as WanPipeline encodes them, and its flow-matching ODE with CFG.

generate_cache.py rolls it out over its full grid to write the cache; kd.py's eval rolls it out over the
student's K grid points (its own few-step sampling, the reference the student should beat).

A Wan2.2 A14B teacher is two experts that split the trajectory, as diffusers' WanPipeline runs them:
`transformer` (high noise) with method.teacher_guidance_scale while t >= boundary_ratio * 1000, then
`transformer_2` (low noise) with method.teacher_guidance_scale_2.

The ODE runs with Euler steps (method.teacher_solver: euler, as the consumers' pairs are made) or UniPC (unipc:
the sampler Wan is published with, its settings read from the teacher's scheduler/scheduler_config.json).
"""

from typing import NamedTuple

import torch

from errors import ConfigError
from flow_matching import NUM_TRAIN_TIMESTEPS, UNIPC_DEFAULTS, ode_solver
from models import autocast, compute_dtype, has_second_expert, load_transformer, pipeline_index


class LowNoiseExpert(NamedTuple):
    """Wan2.2's second expert: it runs, with its own CFG scale, the steps whose timestep is below `boundary`."""

    model: torch.nn.Module
    guidance_scale: float
    boundary: float  # boundary_ratio * 1000, in timesteps


def teacher_experts(cfg):
    """The fingerprint of cfg's teacher experts: {teacher_experts: subfolders, teacher_boundary_ratio,
    teacher_guidance_scale_2}; the last two None for a single-expert (Wan2.1) teacher, all None without one.

    Whether there is a second expert is read from the teacher's model_index.json (transformer_2); the boundary
    is method.teacher_boundary_ratio, by default the model_index.json's boundary_ratio; the low-noise expert's
    guidance is method.teacher_guidance_scale_2, by default teacher_guidance_scale (diffusers' WanPipeline).
    """
    none = {"teacher_experts": None, "teacher_boundary_ratio": None, "teacher_guidance_scale_2": None}
    if cfg.models.teacher is None:
        return none
    init_from, m = cfg.models.teacher.init_from, cfg.method
    index = pipeline_index(init_from)
    if not has_second_expert(index):
        if m.teacher_boundary_ratio is not None:
            raise ConfigError(f"method.teacher_boundary_ratio is set but the teacher {init_from} has one expert "
                              "(no transformer_2 in its model_index.json); remove it")
        return {**none, "teacher_experts": ["transformer"]}
    ratio = m.teacher_boundary_ratio if m.teacher_boundary_ratio is not None else index.get("boundary_ratio")
    if ratio is None:
        raise ConfigError(f"the teacher {init_from} has a transformer_2 but no boundary_ratio in its "
                          "model_index.json; set method.teacher_boundary_ratio")
    scale_2 = m.teacher_guidance_scale if m.teacher_guidance_scale_2 is None else m.teacher_guidance_scale_2
    return {"teacher_experts": ["transformer", "transformer_2"], "teacher_boundary_ratio": float(ratio),
            "teacher_guidance_scale_2": scale_2}


def teacher_solver(cfg):
    """The fingerprint of cfg's ODE solver: {teacher_solver, teacher_solver_settings}; the settings are UniPC's
    (None for Euler), from the teacher's scheduler config when it is a UniPCMultistepScheduler, else diffusers'
    defaults (which Wan's checkpoints keep); None without a teacher to read them from."""
    name = cfg.method.teacher_solver
    if name != "unipc" or cfg.models.teacher is None:
        return {"teacher_solver": name, "teacher_solver_settings": None}
    init_from = cfg.models.teacher.init_from
    scheduler = pipeline_index(init_from).get("scheduler") or [None, None]
    settings = dict(UNIPC_DEFAULTS)
    if scheduler[-1] == "UniPCMultistepScheduler":
        from diffusers import UniPCMultistepScheduler

        found = UniPCMultistepScheduler.load_config(init_from, subfolder="scheduler")
        settings.update({key: found[key] for key in UNIPC_DEFAULTS if key in found})
    return {"teacher_solver": name, "teacher_solver_settings": settings}


def load_expert(init_from, device, subfolder="transformer"):
    """A frozen teacher transformer: bf16 weights on GPU (it needs no fp32 master weights), eval mode."""
    return load_transformer(init_from, device, compute_dtype(device), subfolder).eval().requires_grad_(False)


def load_teacher(cfg, device):
    """(high-noise or only expert, LowNoiseExpert or None) of cfg's teacher, both resident on `device`."""
    experts, init_from = teacher_experts(cfg), cfg.models.teacher.init_from
    model = load_expert(init_from, device)
    if experts["teacher_boundary_ratio"] is None:
        return model, None
    return model, LowNoiseExpert(load_expert(init_from, device, "transformer_2"),
                                 experts["teacher_guidance_scale_2"],
                                 experts["teacher_boundary_ratio"] * NUM_TRAIN_TIMESTEPS)


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
                    low_noise=None, cfg_forward="batched", solver="euler", solver_settings=None, image=None):
    """The ODE over the teacher's sigma grid with classifier-free guidance; the kept states and x0, fp32.

    model: any module with WanTransformer3DModel's forward(hidden_states, timestep, encoder_hidden_states,
    return_dict=False) returning the velocity v = eps - x0. noise [B, C, F, H, W]; prompt_embeds,
    negative_embeds [B, L, D] (negative unused when guidance_scale == 1); sigmas [N] descending from 1 (the
    final 0 is implied); record_steps: step indices whose pre-step state is kept; low_noise: a LowNoiseExpert
    that takes over below its boundary (Wan2.2), or None; cfg_forward: see guided_velocity; solver "euler" or
    "unipc" with its settings (flow_matching.ode_solver); image: the image conditioning of an image-to-video
    teacher (i2v.FirstFrame or i2v.Channels: what the model is given and what is recorded) or None.
    Returns [B, len(record_steps) + 1, C, F, H, W]."""
    ode = ode_solver(solver, sigmas, solver_settings)
    record = set(record_steps)
    x = noise.float()
    kept = []

    def seen(x):  # the state recorded: with Wan2.2-TI2V's first frame, what the model is given
        return x if image is None else image.state(x)

    for i in range(len(sigmas)):
        if i in record:
            kept.append(seen(x))
        t = ode.timestep(i)  # as the model sees it
        expert, scale = model, guidance_scale
        if low_noise is not None and t < low_noise.boundary:  # diffusers' switch, on the timestep it passes
            expert, scale = low_noise.model, low_noise.guidance_scale
        x_in, t_in = (x, t) if image is None else (image.model_input(x), image.timesteps(x, t))
        v = guided_velocity(expert, x_in, t_in, prompt_embeds, negative_embeds, scale, cfg_forward,
                            None if image is None else image.image_embeds)
        x = ode.step(i, x, v)
    kept.append(seen(x))
    return torch.stack(kept, dim=1)


def guided_velocity(model, x, timestep, prompt_embeds, negative_embeds, guidance_scale, cfg_forward,
                    image_embeds=None):
    """v = uncond + g * (cond - uncond) [B, C, F, H, W] fp32 at one timestep (a number, or one per token [L]);
    image_embeds [1, tokens, D]: an I2V teacher's CLIP tokens, the same for both. cfg_forward "batched": cond and
    uncond as one forward of batch 2B; "separate": two forwards of batch B (half the activation memory). The
    two agree to rounding (method.teacher_cfg_forward)."""

    def velocity(x_in, context):
        b = x_in.shape[0]
        t = timestep.expand(b, -1) if torch.is_tensor(timestep) else torch.full((b,), timestep, device=x.device)
        image = {} if image_embeds is None else {"encoder_hidden_states_image": image_embeds.expand(b, -1, -1)}
        with autocast(x.device):
            return model(x_in, t, context, return_dict=False, **image)[0].float()

    if guidance_scale == 1:
        return velocity(x, prompt_embeds)
    if cfg_forward == "batched":
        cond, uncond = velocity(torch.cat([x, x]), torch.cat([prompt_embeds, negative_embeds])).chunk(2)
    else:
        cond, uncond = velocity(x, prompt_embeds), velocity(x, negative_embeds)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def teacher_k_step(cfg, samples, negative_embeds, sigmas, device):
    """{index: x0 [C, F, H, W]} of the teacher's own sampling over the student's K grid points, with CFG (and
    its expert switch) and its solver (method.teacher_solver).

    samples: {index: (initial state [1, C, F, H, W], prompt embeddings [1, L, D], clean context [1, C, F, H, W]
    or None, image conditioning or None)}; negative_embeds [1, L, D]; sigmas [K] the student's matched sigmas;
    CFG runs as method.teacher_cfg_forward says. An AR teacher (causal ODE) samples block by block after each
    sample's context. The teacher is loaded for the call and freed after it.
    """
    m, settings = cfg.method, teacher_solver(cfg)["teacher_solver_settings"]
    if m.context_cache is not None:
        from ar_teacher import causal_rollout, load_ar_teacher  # (it imports diffusers: not at config time)

        model, frames_per_block = load_ar_teacher(cfg.models.teacher.init_from, device)
        return {index: causal_rollout(model, context, noise, embeds, negative_embeds, sigmas,
                                      m.teacher_guidance_scale, [], frames_per_block, True, m.teacher_solver,
                                      settings)[0, -1]
                for index, (noise, embeds, context, _) in samples.items()}
    model, low_noise = load_teacher(cfg, device)
    return {index: teacher_rollout(model, noise, embeds, negative_embeds, sigmas, m.teacher_guidance_scale, [],
                                   low_noise, m.teacher_cfg_forward, m.teacher_solver, settings, image)[0, -1]
            for index, (noise, embeds, _, image) in samples.items()}
