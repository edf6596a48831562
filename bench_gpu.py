"""GPU benchmark at the real Wan sizes, random weights, nothing downloaded: one table and one JSON file.

    python bench_gpu.py                        # one H100/H200, about 5 minutes; writes bench_gpu.json
    python bench_gpu.py --out results.json --latent-frames 21
    python bench_gpu.py --smoke                # tiny sizes, any device (the tests run it on CPU)

Measures, in one process on one device:
  - the dense matmul ceiling (bf16 on GPU): the denominator of every MFU below;
  - one 14B teacher step with CFG, exactly teacher.teacher_rollout's code, both ways teacher_cfg_forward
    offers (cond + uncond as one batch of 2; two forwards of batch 1), at 480x832 x 81 frames (latents
    [16, 21, 60, 104], 32760 tokens), or at the most latent frames that fit;
  - one 1.3B student KD training step through kd.py's own code (FSDP2, bf16 compute, fp32 reduce, fused AdamW,
    kd_frame_losses), bidirectional and block-causal, gradient checkpointing off and on;
  - each one's peak device memory and MFU = model FLOPs / time / ceiling. A variant that runs out of memory or
    fails is a row saying so, and the others still run. FLOPs come from wan_forward_flops
    (training: 3x forward, recomputation not counted), which the tests check against torch's FlopCounterMode.

Architectures are the published Wan2.1-T2V-14B and -1.3B transformer configs.
"""

import argparse
import time

import torch

import kd
from atomic_files import write_json_atomic
from distributed import init_distributed, shutdown_distributed
from errors import one_line
from flow_matching import NUM_TRAIN_TIMESTEPS
from models import compute_dtype
from teacher import teacher_rollout

WAN_14B = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096,
               freq_dim=256, in_channels=16, out_channels=16, patch_size=(1, 2, 2), cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_1_3B = dict(WAN_14B, num_attention_heads=12, ffn_dim=8960, num_layers=30)
SMOKE = dict(WAN_14B, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=32,
             freq_dim=32)
# name: (teacher config, student config, latents [C, F, H, W], text tokens, matmul size, model labels)
SIZES = {
    "real": (WAN_14B, WAN_1_3B, (16, 21, 60, 104), 512, 8192, ("14B", "1.3B")),
    "smoke": (SMOKE, SMOKE, (16, 5, 8, 8), 16, 256, ("smoke", "smoke")),
}
FRAMES_PER_BLOCK = 3  # block-causal students (Self-Forcing's blocks of 3 latent frames)
TIMED = 3  # timed repetitions after one warm-up
CFG_FORWARDS = {"batched": "CFG batch 2", "separate": "CFG 2 x batch 1"}  # teacher_cfg_forward: row label


def wan_forward_flops(config, latents, text_tokens, batch, frames_per_block=None):
    """Matmul FLOPs of one WanTransformer3DModel forward; with frames_per_block, block-causal self-attention
    and per-frame timesteps (kd.py's causal student)."""
    d, ffn, layers = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"], \
        config["num_layers"]
    c, f, h, w = latents
    p_t, p_h, p_w = config["patch_size"]
    per_frame = (h // p_h) * (w // p_w)
    tokens = (f // p_t) * per_frame
    patch = c * p_t * p_h * p_w
    if frames_per_block:  # query block i sees the keys of blocks 0..i
        n = frames_per_block * per_frame
        key_pairs = sum(min(n, tokens - i) * min(i + n, tokens) for i in range(0, tokens, n))
    else:
        key_pairs = tokens * tokens
    freq, text_dim = config["freq_dim"], config["text_dim"]
    per_layer = (2 * 4 * tokens * d * d  # self-attention q, k, v, out
                 + 2 * 2 * key_pairs * d  # self-attention scores and weighted sum
                 + 2 * 2 * tokens * d * d + 2 * 2 * text_tokens * d * d  # cross-attention q, out; k, v
                 + 2 * 2 * tokens * text_tokens * d  # cross-attention scores and weighted sum
                 + 2 * 2 * tokens * d * ffn)  # feed-forward
    embed = (2 * tokens * patch * d + 2 * tokens * d * patch  # patch embedding, output projection
             + 2 * text_tokens * (text_dim * d + d * d)  # text embedder
             # time embedding, per frame
             + 2 * (freq * d + d * d + d * 6 * d) * (f if frames_per_block else 1))
    return batch * (layers * per_layer + embed)


def wan_on(device, config, dtype):
    """A random-weight WanTransformer3DModel created directly on `device` in `dtype` (no CPU copy of 14B)."""
    from diffusers import WanTransformer3DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return WanTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(default)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Median seconds of fn() over TIMED calls after one warm-up, and the peak device memory in bytes (or
    None)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fn()
    times = []
    for _ in range(TIMED):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], peak


def matmul_ceiling(device, n):
    """Dense matmul FLOP/s: bf16 on GPU, fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds, _ = timed(lambda: [a @ b for _ in range(10)], device)
    return 10 * 2 * n**3 / seconds


def teacher_cfg_step(device, config, latents, text_tokens, cfg_forward):
    """(seconds, peak bytes) of one CFG teacher step, as teacher.teacher_rollout runs it."""
    model = wan_on(device, config, compute_dtype(device)).eval().requires_grad_(False)
    noise = torch.randn(1, *latents, device=device)  # [1, C, F, H, W]
    cond = torch.randn(1, text_tokens, config["text_dim"], device=device)  # [1, L, D]
    uncond = torch.randn(1, text_tokens, config["text_dim"], device=device)
    sigmas = torch.tensor([1.0])
    try:
        return timed(lambda: teacher_rollout(model, noise, cond, uncond, sigmas, 5.0, [],
                                             cfg_forward=cfg_forward), device)
    finally:
        del model


def student_train_step(device, config, latents, text_tokens, attention, checkpointing):
    """(seconds, peak bytes) of one KD optimizer step of a sharded student, as KDTrainer.train_step runs
    it."""
    model = kd.shard_student(wan_on(device, config, torch.float32), attention, FRAMES_PER_BLOCK,
                             checkpointing, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    frames = latents[1]
    # [1, C, F, H, W]
    x_t, x0 = torch.randn(1, *latents, device=device), torch.randn(1, *latents, device=device)
    embeds = torch.randn(1, text_tokens, config["text_dim"], device=device)
    if attention == "block_causal":  # each block of frames at its own noise level
        steps = torch.arange(frames, device=device) // FRAMES_PER_BLOCK % 4
    else:
        steps = torch.full((frames,), 1, device=device)
    t_frames = torch.tensor([999.0, 937.0, 833.0, 624.0], device=device)[steps][None]  # [1, F]
    sigma_frames = t_frames / NUM_TRAIN_TIMESTEPS

    def step():
        losses = kd.kd_frame_losses(model, x_t, x0, t_frames, sigma_frames, attention != "block_causal",
                                    embeds)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        return timed(step, device)
    finally:
        del model, optimizer


def out_of_memory(error):
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def run(size, out_path, latent_frames=None):
    teacher_cfg, student_cfg, latents, text_tokens, n, (teacher_label, student_label) = SIZES[size]
    if latent_frames:
        latents = (latents[0], latent_frames, *latents[2:])
    rank, world, device = init_distributed()  # a world of one: FSDP2 needs a process group
    if device.type == "cpu":  # tiny ops on a busy machine: more threads only add synchronisation
        torch.set_num_threads(1)
    ceiling = matmul_ceiling(device, n)
    rows = []
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result = {"size": size, "device": device_name, "torch": torch.__version__, "text_tokens": text_tokens,
              "matmul_ceiling_tflops_per_s": ceiling / 1e12, "results": rows,
              "cfg_batched_over_separate": None}

    def record(name, config, shape, flops, measure):
        try:
            seconds, peak = measure()
            status = "ok"
        except Exception as e:  # noted in the table; the other variants still run
            seconds, peak = None, None
            status = "out of memory" if out_of_memory(e) else f"failed: {type(e).__name__}: {one_line(e)}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        tokens = shape[1] * (shape[2] // 2) * (shape[3] // 2)
        rows.append({"name": name, "layers": config["num_layers"],
                     "width": config["num_attention_heads"] * config["attention_head_dim"],
                     "latents": list(shape), "tokens": tokens, "status": status, "seconds": seconds,
                     "flops": flops, "tflops_per_s": flops / seconds / 1e12 if seconds else None,
                     "mfu": flops / seconds / ceiling if seconds else None,
                     "peak_memory_gib": peak / 2**30 if peak is not None else None})
        result["cfg_batched_over_separate"] = cfg_ratio(rows)
        write_json_atomic(out_path, result)  # after every row: a run stopped part-way leaves its rows
        return status

    frame_options = [latents[1]] + [f for f in (13, 9, 5) if f < latents[1] and not latent_frames]
    for frames in frame_options:  # the largest shape whose teacher steps fit
        shape = (latents[0], frames, *latents[2:])
        statuses = [record(f"teacher {teacher_label} step, {label}", teacher_cfg, shape,
                           wan_forward_flops(teacher_cfg, shape, text_tokens, 2),
                           lambda: teacher_cfg_step(device, teacher_cfg, shape, text_tokens, cfg_forward))
                    for cfg_forward, label in CFG_FORWARDS.items()]
        if "out of memory" not in statuses:
            break
    for attention in ("full", "block_causal"):
        for checkpointing in (False, True):
            flops = 3 * wan_forward_flops(student_cfg, latents, text_tokens, 1,
                                          FRAMES_PER_BLOCK if attention == "block_causal" else None)
            name = f"student {student_label} KD step, " \
                   f"{'bidirectional' if attention == 'full' else 'block-causal'}, " \
                   f"checkpointing {'on' if checkpointing else 'off'}"
            record(name, student_cfg, latents, flops,
                   lambda: student_train_step(device, student_cfg, latents, text_tokens, attention,
                                              checkpointing))
    shutdown_distributed()
    print_table(result)
    return result


def cfg_ratio(rows):
    """Seconds of the batched CFG teacher step / the separate one, at the largest shape both ran, or None."""
    seconds = {}
    for row in rows:
        for cfg_forward, label in CFG_FORWARDS.items():
            if row["name"].endswith(label) and row["status"] == "ok":
                seconds.setdefault(tuple(row["latents"]), {})[cfg_forward] = row["seconds"]
    both = [pair for pair in seconds.values() if len(pair) == 2]
    return both[0]["batched"] / both[0]["separate"] if both else None


def print_table(result):
    print(f"bench_gpu ({result['size']} sizes) on {result['device']}, torch {result['torch']}: "
          f"matmul ceiling {result['matmul_ceiling_tflops_per_s']:.3g} TFLOP/s; "
          f"{result['text_tokens']} text tokens")
    print(f"  {'measure':<58} {'latents':<18} {'seconds':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for row in result["results"]:
        if row["status"] != "ok":
            print(f"  {row['name']:<58} {str(row['latents']):<18} {row['status']}")
            continue
        memory = f"{row['peak_memory_gib']:9.1f}" if row["peak_memory_gib"] is not None else f"{'n/a':>9}"
        print(f"  {row['name']:<58} {str(row['latents']):<18} {row['seconds']:8.3f} "
              f"{row['tflops_per_s']:8.3g} {row['mfu']:6.1%} {memory}")
    if result["cfg_batched_over_separate"] is not None:
        print(f"  CFG teacher step: batched / separate = {result['cfg_batched_over_separate']:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, for a CPU check of the whole script")
    parser.add_argument("--out", default="bench_gpu.json", help="JSON results file")
    parser.add_argument("--latent-frames", type=int,
                        help="latent frames instead of 21 (1 + (frames - 1) / 4)")
    args = parser.parse_args()
    run("smoke" if args.smoke else "real", args.out, args.latent_frames)


if __name__ == "__main__":
    main()
