"""Previews: held-out samples decoded with the student directory's VAE, labelled rows read at a glance.

Each preview is two files, both labelled with the sample's prompt and each row's name:
- sample-{index}.png: a strip of one row per video, PREVIEW_FRAMES frames evenly spaced from the first to the
  last, each frame upscaled (nearest neighbour) to at least MIN_TILE pixels, the row labels on the left;
- sample-{index}.gif: the videos side by side, every frame, looping.
Another row is one more (label, latents) pair: the layout follows the number of rows.
"""

import math
import os
from typing import NamedTuple

import torch

from atomic_files import write_atomic

PREVIEW_FRAMES = 5  # columns of a preview strip: frames evenly spaced from the first to the last
MIN_TILE = 128  # pixels: frames smaller than this on a side are upscaled by a whole factor to reach it
GAP = 4  # pixels between frames, rows and bands
GIF_FRAME_MS = 125  # 8 frames per second
GIF_HOLD_MS = 1000  # the last frame stays a second before the loop starts again
PAPER, INK = (255, 255, 255), (0, 0, 0)


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


def upscale_factor(height, width):
    """The whole factor that brings a height x width frame's shorter side to at least MIN_TILE pixels."""
    return max(1, math.ceil(MIN_TILE / min(height, width)))


def font(tile):
    """Pillow's default font at a size readable beside tiles of `tile` pixels (its bitmap font without
    FreeType)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(14, tile // 8))
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def text_size(face, text):
    """(width, height) in pixels of `text` drawn in `face`."""
    left, top, right, bottom = face.getbbox(text)
    return right - left, bottom - top


def band(face):
    """Height in pixels of a band holding one line of text drawn GAP below its top (descenders included)."""
    return face.getbbox("Agpy")[3] + 2 * GAP


class Layout(NamedTuple):
    """Where tile (row r, column c) of a labelled grid starts: (top + r * pitch_y, left + c * pitch_x)."""

    scale: int  # nearest-neighbour upscale factor of each frame
    left: int
    top: int
    pitch_x: int
    pitch_y: int
    width: int  # of the whole image
    height: int

    def origin(self, row, column):
        """(y, x) of the tile's top-left pixel."""
        return self.top + row * self.pitch_y, self.left + column * self.pitch_x


def strip_layout(num_rows, frame_shape, labels, face):
    """Layout of the PNG strip: the caption band, a band of frame numbers, then rows with labels on the left.
    """
    height, width = frame_shape
    scale = upscale_factor(height, width)
    line = band(face)
    left = max(text_size(face, label)[0] for label in labels) + 3 * GAP
    pitch_x, pitch_y = width * scale + GAP, height * scale + GAP
    top = 2 * line
    return Layout(scale, left, top, pitch_x, pitch_y, left + PREVIEW_FRAMES * pitch_x,
                  top + num_rows * pitch_y)


def gif_layout(num_rows, frame_shape, labels, face):
    """Layout of the GIF: the caption band, a band of row labels, then the videos side by side (row 0)."""
    height, width = frame_shape
    scale = upscale_factor(height, width)
    line = band(face)
    pitch_x = max(width * scale, *(text_size(face, label)[0] for label in labels)) + 3 * GAP
    return Layout(scale, GAP, 2 * line, pitch_x, height * scale + GAP, num_rows * pitch_x + GAP,
                  2 * line + height * scale + GAP)


def paste(canvas, frame, layout, row, column):
    """Draw frame [3, H, W] in [-1, 1] upscaled into canvas [H', W', 3] uint8 at tile (row, column)."""
    tile = to_uint8(frame).permute(1, 2, 0)  # [H, W, 3]
    tile = tile.repeat_interleave(layout.scale, 0).repeat_interleave(layout.scale, 1)
    y, x = layout.origin(row, column)
    canvas[y : y + tile.shape[0], x : x + tile.shape[1]] = tile


def labelled_image(canvas, face, texts, smooth=True):
    """PIL image of canvas [H, W, 3] uint8 with each (x, y, text) of `texts` drawn in INK; smooth: anti-aliased
    (without, the text adds no colours to a GIF's palette)."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(canvas.numpy())
    draw = ImageDraw.Draw(image)
    draw.fontmode = "L" if smooth else "1"
    for x, y, text in texts:
        draw.text((x, y), text, fill=INK, font=face)
    return image


def preview_strip(rows, labels, caption):
    """PIL image: `caption` on top, frame numbers, then row r (`labels[r]` on the left) of rows[r] [3, F, H,
    W] at PREVIEW_FRAMES evenly spaced frames, upscaled."""
    face = font(upscale_factor(*rows[0].shape[2:]) * min(rows[0].shape[2:]))
    layout = strip_layout(len(rows), rows[0].shape[2:], labels, face)
    frames = torch.linspace(0, rows[0].shape[1] - 1, PREVIEW_FRAMES).round().long().tolist()
    canvas = torch.full((layout.height, layout.width, 3), 255, dtype=torch.uint8)
    for r, video in enumerate(rows):
        for c, f in enumerate(frames):
            paste(canvas, video[:, f], layout, r, c)
    line = layout.top // 2
    texts = [(GAP, GAP, caption)]
    texts += [(layout.origin(0, c)[1], line + GAP, f"frame {f}") for c, f in enumerate(frames)]
    tile_h = layout.pitch_y - GAP
    texts += [(GAP, layout.origin(r, 0)[0] + (tile_h - text_size(face, label)[1]) // 2, label)
              for r, label in enumerate(labels)]
    return labelled_image(canvas, face, texts)


def preview_gif_frames(rows, labels, caption):
    """PIL images, one per video frame: `caption` and the frame number on top, the videos side by side, each
    under its label."""
    face = font(upscale_factor(*rows[0].shape[2:]) * min(rows[0].shape[2:]))
    layout = gif_layout(len(rows), rows[0].shape[2:], labels, face)
    line = layout.top // 2
    num_frames = rows[0].shape[1]
    images = []
    for f in range(num_frames):
        canvas = torch.full((layout.height, layout.width, 3), 255, dtype=torch.uint8)
        for c, video in enumerate(rows):
            paste(canvas, video[:, f], layout, 0, c)
        texts = [(GAP, GAP, f"{caption}    frame {f}/{num_frames - 1}")]
        texts += [(layout.origin(0, c)[1], line + GAP, label) for c, label in enumerate(labels)]
        images.append(labelled_image(canvas, face, texts, smooth=False))
    return images


def write_png(path, image):
    """Write a PIL image as PNG whatever the path's suffix."""
    image.save(path, format="PNG")


def write_gif(path, images):
    """Write PIL images as a looping animated GIF whatever the path's suffix, the last frame held longer."""
    durations = [GIF_FRAME_MS] * (len(images) - 1) + [GIF_HOLD_MS]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)


def write_previews(folder, vae, samples, labels, captions=None):
    """For each (index, [latents [C, F, H, W] per row]) in `samples`: sample-{index}.png, the labelled strip
    of len(labels) rows by PREVIEW_FRAMES frames, and sample-{index}.gif, the rows side by side, every frame.

    captions: {index: text shown on top, e.g. the prompt}; without one the caption is "sample {index}".
    """
    os.makedirs(folder, exist_ok=True)
    for index, latents in samples:
        rows = [decode_latents(vae, x) for x in latents]  # each [3, F', H', W']
        caption = f'sample {index}: "{captions[index]}"' if index in (captions or {}) else f"sample {index}"
        strip = preview_strip(rows, labels, caption)
        write_atomic(os.path.join(folder, f"sample-{index}.png"), lambda p, image=strip: write_png(p, image))
        frames = preview_gif_frames(rows, labels, caption)
        write_atomic(os.path.join(folder, f"sample-{index}.gif"), lambda p, ims=frames: write_gif(p, ims))
