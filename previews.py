"""Previews: held-out samples decoded with the student directory's VAE, rows of videos side by side.

Each preview is sample-{index}.png, a strip of one row per video by PREVIEW_FRAMES frames evenly spaced from
the first to the last, and sample-{index}.mp4 (the rows stacked, every frame) when imageio can write MP4.
"""

import os

import torch

from atomic_files import write_atomic

PREVIEW_FRAMES = 5  # columns of a preview strip: frames evenly spaced from the first to the last


@torch.no_grad()
def decode_latents(vae, latents):
    """Video [3, F', H', W'] in [-1, 1] of normalised latents [C, F, H, W], as WanPipeline decodes."""
    mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(-1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=latents.device).view(-1, 1, 1, 1)
    video = vae.decode((latents.float() / inv_std + mean)[None], return_dict=False)[0]  # [1, 3, F', H', W']
    return video[0].float().cpu()


def to_uint8(video):
    """[-1, 1] -> 0..255 uint8, same shape."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def preview_strip(rows, num_frames=PREVIEW_FRAMES):
    """Image [H * len(rows), W * num_frames, 3] uint8: row r, rows[r] [3, F, H, W] at evenly spaced frames."""
    frames = torch.linspace(0, rows[0].shape[1] - 1, num_frames).round().long().tolist()
    strips = [torch.cat([video[:, f] for f in frames], dim=2) for video in rows]  # each [3, H, W*n]
    grid = torch.cat(strips, dim=1)  # [3, H*R, W*n]
    return to_uint8(grid).permute(1, 2, 0)


def write_png(path, image):
    """Write an [H, W, 3] uint8 image as PNG whatever the path's suffix (Pillow comes with diffusers)."""
    from PIL import Image

    Image.fromarray(image.numpy()).save(path, format="PNG")


def mp4_writer():
    """imageio's writer function when imageio and its ffmpeg plugin are installed, else None."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (imageio writes MP4 through it)
    except ImportError:
        return None
    return imageio.mimwrite


def write_previews(folder, vae, samples, labels):
    """For each (index, [latents [C, F, H, W] per row]) in `samples`: sample-{index}.png, a strip of
    len(labels) rows by PREVIEW_FRAMES frames, and sample-{index}.mp4 (the rows stacked, every frame) when
    imageio can write MP4."""
    os.makedirs(folder, exist_ok=True)
    mimwrite = mp4_writer()
    for index, latents in samples:
        rows = [decode_latents(vae, x) for x in latents]  # each [3, F', H', W']
        strip = preview_strip(rows)
        write_atomic(os.path.join(folder, f"sample-{index}.png"), lambda p, image=strip: write_png(p, image))
        if mimwrite is not None:
            video = to_uint8(torch.cat(rows, dim=2)).permute(1, 2, 3, 0).numpy()  # [F', H'*R, W', 3]
            mimwrite(os.path.join(folder, f"sample-{index}.mp4"), list(video), fps=8)
    with open(os.path.join(folder, "rows.txt"), "w") as f:
        f.write("rows, top to bottom: " + " | ".join(labels)
                + f"; columns: {PREVIEW_FRAMES} frames, first to last\n")
