"""Measurements that print ratios side by side, on this machine's CPU.

    python bench.py memory    # peak memory of one causal training step: per-frame vs per-token timesteps

Each variant runs in a fresh process so that peak resident memory (ru_maxrss) belongs to it alone.
"""

import json
import resource
import subprocess
import sys

import torch

import kd

# Realistic token count: 81 frames at 480x832 -> latents [16, 21, 60, 104] -> 21 x 30 x 52 = 32760 tokens.
# Width-reduced (Wan2.1-1.3B is 1536 wide, 30 layers) so that a step fits a 2-core CPU in seconds per variant.
MEMORY_SHAPE = (1, 16, 21, 60, 104)
MEMORY_MODEL = dict(num_attention_heads=2, attention_head_dim=64, ffn_dim=256, num_layers=2, text_dim=64,
                    freq_dim=64, in_channels=16, out_channels=16)
VARIANTS = {  # name: (attention, timestep layout)
    "bidirectional, timestep [B]": ("full", "batch"),
    "per-frame timesteps via diffusers' per-token [B, L]": ("full", "token"),
    "per-frame timesteps, ours [B, F]": ("full", "frame"),
    "block-causal, per-frame timesteps [B, F]": ("block_causal", "frame"),
}


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def memory_variant(name):
    """Peak bytes above the set-up of one forward+backward of the KD loss, in this process."""
    from diffusers import WanTransformer3DModel

    attention, layout = VARIANTS[name]
    torch.manual_seed(0)
    model = WanTransformer3DModel(**MEMORY_MODEL)
    kd.accept_frame_timesteps(model)
    if attention == "block_causal":
        kd.make_block_causal(model, 3)
    b, c, f, h, w = MEMORY_SHAPE
    x, x0 = torch.randn(MEMORY_SHAPE), torch.randn(MEMORY_SHAPE)
    text = torch.randn(b, 512, MEMORY_MODEL["text_dim"])
    t_frames = torch.randint(0, 4, (b, (f + 2) // 3)).repeat_interleave(3, 1)[:, :f].float() * 100 + 600
    timestep = {"batch": t_frames[:, 0], "frame": t_frames,
                "token": t_frames.repeat_interleave((h // 2) * (w // 2), dim=1)}[layout]
    before = _rss_bytes()
    v = model(x, timestep, text, return_dict=False)[0]
    (0.5 * (x - t_frames[:, None, :, None, None] / 1000 * v - x0).pow(2).mean()).backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def memory_table():
    results = {}
    for name in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "memory-variant", name], capture_output=True, text=True,
                             check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["bidirectional, timestep [B]"]
    tokens = MEMORY_SHAPE[2] * (MEMORY_SHAPE[3] // 2) * (MEMORY_SHAPE[4] // 2)
    print(f"peak memory of one training step, {tokens} tokens, width {2 * 64}, {MEMORY_MODEL['num_layers']} layers "
          "(CPU, fp32)")
    for name, peak in results.items():
        print(f"  {name:<55} {peak / 2**30:6.2f} GiB  {peak / base:5.2f}x bidirectional")
    for label, width in (("Wan2.1-1.3B", 1536), ("Wan2.1-14B", 5120)):
        print(f"  per-token modulation [B, L, 6, D] fp32 at {label} width: {6 * tokens * width * 4 / 2**30:.2f} GiB "
              "per block (ours: [B, F, 6, D])")


if __name__ == "__main__":
    if sys.argv[1:2] == ["memory-variant"]:
        torch.set_num_threads(2)
        print(json.dumps(memory_variant(sys.argv[2])))
    elif sys.argv[1:] in ([], ["memory"]):
        memory_table()
    else:
        raise SystemExit(__doc__)
