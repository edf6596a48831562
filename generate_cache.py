"""Write the teacher's ODE trajectory cache: one numbered .safetensors file per prompt, resumable, any number of ranks.

    python generate_cache.py configs/tiny.yaml
    torchrun --standalone --nproc_per_node=2 generate_cache.py configs/tiny.yaml data.num_samples=8
    torchrun --nproc_per_node=8 generate_cache.py configs/wan.yaml

Sample i is prompt i of `data.prompts`, rolled out by the teacher from noise seeded with `data.seed + i`, so the
files are the same whatever the number of ranks and however often the run was interrupted. Finished files are
checked and kept; unusable ones (truncated, wrong shape) and stray temporary files are regenerated. The layout
is described in kd.py and the README.
"""

import os
import sys
import time

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import kd


@torch.no_grad()
def teacher_rollout(model, noise, prompt_embeds, negative_embeds, sigmas, guidance_scale, record_steps):
    """Euler over the teacher's sigma grid with classifier-free guidance; the kept states and x0, fp32.

    model: any module with WanTransformer3DModel's forward(hidden_states, timestep, encoder_hidden_states,
    return_dict=False) returning the velocity v = eps - x0.
    noise [B, C, F, H, W]; prompt_embeds, negative_embeds [B, L, D] (negative unused when guidance_scale == 1);
    sigmas [N] descending from 1 (the final 0 is implied); record_steps: step indices whose pre-step state is kept.
    Returns [B, len(record_steps) + 1, C, F, H, W].
    """
    guided = guidance_scale != 1
    context = torch.cat([prompt_embeds, negative_embeds]) if guided else prompt_embeds  # [B or 2B, L, D]
    sig = [float(s) for s in sigmas] + [0.0]
    record = set(record_steps)
    x = noise.float()
    kept = []
    for i in range(len(sigmas)):
        if i in record:
            kept.append(x)
        model_in = torch.cat([x, x]) if guided else x  # cond and uncond in one batched forward
        t = torch.full((model_in.shape[0],), sig[i] * kd.NUM_TRAIN_TIMESTEPS, device=x.device)
        with kd.autocast(x.device):
            v = model(model_in, t, context, return_dict=False)[0].float()
        if guided:
            cond, uncond = v.chunk(2)
            v = uncond + guidance_scale * (cond - uncond)
        x = kd.euler_step(x, v, sig[i], sig[i + 1])
    kept.append(x)
    return torch.stack(kept, dim=1)


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


def initial_noise(shape, seed):
    """[1, C, F, H, W] float32 standard normal, drawn on the CPU so it is the same on every device."""
    return torch.randn([1, *shape], generator=torch.Generator().manual_seed(seed))


def write_sample(path, latents, timesteps, prompt_embeds, info):
    """One sample file; its metadata is `info` plus the CRC32 checksums the dataset verifies (kd.sample_metadata)."""
    tensors = {"latents": latents.contiguous(), "timesteps": timesteps, "prompt_embeds": prompt_embeds.contiguous()}
    metadata = kd.checksum_metadata(tensors, info)
    kd.write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def remove_leftovers(cache_dir):
    """Temporary files of writes that never finished (a crash between write and rename)."""
    for folder in (cache_dir, os.path.join(cache_dir, "samples")):
        for name in os.listdir(folder):
            if name.endswith(kd.TMP_SUFFIX):
                os.remove(os.path.join(folder, name))


def missing_samples(cache_dir, fingerprint, rank, world_size):
    """Sorted indices with no usable file; each rank checks (and deletes the bad among) its stride of files."""
    mine = []
    for i in range(rank, fingerprint["num_samples"], world_size):
        path = kd.sample_path(cache_dir, i)
        if not os.path.exists(path):
            mine.append(i)
            continue
        problem = kd.sample_file_problem(path, fingerprint, i)
        if problem is not None:
            print(f"[rank {rank}] regenerating {path}: {problem}", file=sys.stderr)
            os.remove(path)
            mine.append(i)
    return sorted(i for part in kd.all_gather_objects(mine) for i in part)


def generate_cache(cfg, rank=0, world_size=1, device=torch.device("cpu")):
    """Complete cfg's trajectory cache, all ranks together (call on every rank); returns the number written."""
    teacher = cfg.models.teacher
    if teacher is None:
        raise kd.ConfigError("generating the trajectory cache needs models.teacher (with init_from)")
    cache_dir = cfg.method.teacher_path_cache
    prompts = kd.read_prompts(cfg)
    shape = kd.latent_shape(teacher.init_from, cfg)
    fingerprint = kd.cache_fingerprint(cfg, prompts, shape)
    kd.check_cache_metadata(cache_dir, fingerprint)  # every rank, so every rank stops on a stale cache
    if rank == 0:
        kd.make_dirs(os.path.join(cache_dir, "samples"))
        if not os.path.exists(os.path.join(cache_dir, "metadata.json")):  # first, so a resume can be checked
            kd.write_json_atomic(os.path.join(cache_dir, "metadata.json"), fingerprint)
        remove_leftovers(cache_dir)
        negative = kd.negative_embeds_path(cache_dir)
        problem = kd.negative_embeds_problem(cache_dir) if os.path.exists(negative) else None
        if problem is not None:
            print(f"[rank 0] regenerating {negative}: {problem}", file=sys.stderr)
            os.remove(negative)
    kd.barrier()
    missing = missing_samples(cache_dir, fingerprint, rank, world_size)
    complete_marker = os.path.join(cache_dir, "COMPLETE")
    if rank == 0 and missing and os.path.exists(complete_marker):
        os.remove(complete_marker)
    mine = missing[rank::world_size]
    if mine or (rank == 0 and not os.path.exists(kd.negative_embeds_path(cache_dir))):
        _write_samples(cfg, mine, prompts, fingerprint, device, rank, world_size, missing)
    kd.barrier()  # ranks with fewer samples wait here; nothing collective runs inside the sample loop
    if rank == 0:
        paths = [kd.sample_path(cache_dir, i) for i in range(len(prompts))] + [kd.negative_embeds_path(cache_dir)]
        absent = [p for p in paths if not os.path.exists(p)]
        if absent:
            raise RuntimeError(f"{absent[:10]} were not written")
        kd.write_json_atomic(complete_marker, {"num_samples": len(prompts)})
    kd.barrier()
    return len(missing)


def _write_samples(cfg, indices, prompts, fingerprint, device, rank, world_size, missing):
    m, dtype = cfg.method, kd.CACHE_DTYPES[cfg.data.cache_dtype]
    max_len = cfg.pipeline.max_sequence_length
    encoder, tokenizer = kd.load_text_encoder(cfg.models.teacher.init_from, device)
    # Round-trip through the cache dtype so the teacher is conditioned on exactly what the student will read.
    embeds = {i: encode_prompt(encoder, tokenizer, prompts[i], max_len, device).to(dtype) for i in indices}
    negative = encode_prompt(encoder, tokenizer, m.teacher_negative_prompt, max_len, device).to(dtype)
    del encoder, tokenizer
    kd.free_device_memory(device)  # the text encoder is gone before the teacher arrives
    if rank == 0 and not os.path.exists(kd.negative_embeds_path(m.teacher_path_cache)):  # for K-step references
        tensors = {"prompt_embeds": negative.contiguous()}
        metadata = kd.checksum_metadata(tensors, {"prompt": m.teacher_negative_prompt})
        kd.write_atomic(kd.negative_embeds_path(m.teacher_path_cache), lambda tmp: save_file(tensors, tmp, metadata))
    if not indices:
        return

    # The teacher is frozen and replicated: bf16 parameters on GPU halve its memory; nothing here needs fp32 master
    # weights or FSDP.
    model = kd.load_transformer(cfg.models.teacher.init_from, device, kd.compute_dtype(device))
    model.eval().requires_grad_(False)
    sigmas = kd.shifted_sigmas(m.teacher_inference_steps, cfg.pipeline.flow_shift)
    record = kd.recorded_steps(cfg)
    timesteps = torch.tensor(fingerprint["timesteps"], dtype=torch.float32)
    negative_in = kd.pad_embeds(negative, max_len).float()[None].to(device)  # [1, max_len, D]
    cache_dir = m.teacher_path_cache
    done_before = fingerprint["num_samples"] - len(missing)
    bar = tqdm(total=fingerprint["num_samples"], initial=done_before, unit="sample", disable=rank != 0,
               desc="teacher trajectories", dynamic_ncols=True)
    queues = [missing[r::world_size] for r in range(world_size)]  # every rank writes its share in this order
    written = [0] * world_size
    for i in indices:
        seed = cfg.data.seed + i
        noise = initial_noise(fingerprint["latent_shape"], seed).to(device)  # [1, C, F, H, W]
        prompt_in = kd.pad_embeds(embeds[i], max_len).float()[None].to(device)  # [1, max_len, D]
        states = teacher_rollout(model, noise, prompt_in, negative_in, sigmas, m.teacher_guidance_scale,
                                 record)  # [1, K+1, C, F, H, W]
        if not torch.isfinite(states).all():  # a diverged teacher must not leave a checksummed, poisoned file
            raise FloatingPointError(f"the teacher's trajectory for sample {i} (prompt {prompts[i]!r}) is not finite; "
                                     "nothing was written for it")
        write_sample(kd.sample_path(cache_dir, i), states[0].to(dtype).cpu(), timesteps, embeds[i],
                     {"prompt": prompts[i], "seed": seed, "index": i, "format_version": kd.CACHE_FORMAT_VERSION})
        if rank == 0:  # the bar counts every rank's files, so it shows the global rate and ETA
            for r, queue in enumerate(queues):  # a few stats per sample, even for a huge cache on a network FS
                while written[r] < len(queue) and os.path.exists(kd.sample_path(cache_dir, queue[written[r]])):
                    written[r] += 1
            bar.update(done_before + sum(written) - bar.n)
    bar.close()
    del model
    kd.free_device_memory(device)


def main(argv):
    cfg = kd.config_from_argv(argv)
    kd.check_paths(cfg)
    rank, world_size, device = kd.init_distributed()
    start = time.perf_counter()
    written = generate_cache(cfg, rank, world_size, device)
    elapsed = time.perf_counter() - start
    if rank == 0:
        cache_dir = cfg.method.teacher_path_cache
        size = os.path.getsize(kd.sample_path(cache_dir, 0))
        rate = f", {elapsed / written * world_size:.2f} s per sample per rank" if written else ""
        print(f"cache {cache_dir} complete: {written} samples written in {elapsed:.1f} s on {world_size} "
              f"rank(s){rate}; {size / 2**20:.3f} MiB per sample file")
    kd.shutdown_distributed()


if __name__ == "__main__":
    kd.run_cli(main, sys.argv[1:])
