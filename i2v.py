"""Image-to-video conditioning: the one module the teacher and the cache call for it (docs/i2v.md).

A teacher directory says what it is conditioned on:
- "text": a text-to-video Wan (Wan2.1-T2V, Wan2.2-T2V-A14B);
- "first_frame": Wan2.2-TI2V-5B, whose model_index.json sets expand_timesteps. diffusers' WanImageToVideoPipeline
  replaces the first latent frame of the model's input by the image's clean latent at every step and gives its
  tokens timestep 0; the ODE steps the whole latent, and the result's first frame is the image latent again;
- "channels": Wan2.1-I2V and Wan2.2-I2V-A14B (the image latent, with a mask, as extra input channels; not yet).

The images come from data.prompts (JSONL or CSV with prompt and image columns: config.prompt_rows), prepared as
the pipeline prepares them (diffusers' VideoProcessor: resized to pipeline.height x width, scaled to [-1, 1])
and encoded by the teacher's VAE (the mode of its latent distribution, normalised by the VAE config's
latents_mean and latents_std). A student of such a teacher's pairs continues the first frame of each x0, which is
the image latent (method.first_frame_given).
"""

import hashlib
import os

import torch

from config import prompt_rows
from errors import ConfigError, one_line
from models import pipeline_index


def teacher_conditioning(init_from):
    """"text", "first_frame" or "channels": what the teacher directory (or hub id) is conditioned on."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    if pipeline_index(init_from).get("expand_timesteps"):
        return "first_frame"
    transformer = WanTransformer3DModel.load_config(init_from, subfolder="transformer")
    latent_channels = AutoencoderKLWan.load_config(init_from, subfolder="vae").get("z_dim", 16)
    return "channels" if transformer["in_channels"] > latent_channels else "text"


def conditioning(cfg):
    """The fingerprint of what cfg's teacher is conditioned on: "text", or for an image-conditioned teacher its
    kind and the SHA-256 of every sample's image file, in order; None without a teacher (not compared)."""
    if cfg.models.teacher is None:
        return None
    kind = teacher_conditioning(cfg.models.teacher.init_from)
    if kind == "text":
        return "text"
    digest = hashlib.sha256()
    for path in image_paths(cfg):
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return {"kind": kind, "images_sha256": digest.hexdigest()}


def check_conditioning(cfg):
    """ConfigError naming the field unless the prompts, the teacher and method.first_frame_given agree."""
    teacher = cfg.models.teacher
    if teacher is None or not cfg.data.prompts:
        return
    kind = teacher_conditioning(teacher.init_from)
    named = [image for _, image in prompt_rows(cfg) if image is not None]
    if kind == "text":
        if named:
            raise ConfigError(f"data.prompts: {cfg.data.prompts} names images but the teacher {teacher.init_from} is "
                              "text-to-video (it would ignore them); use a prompts file without images")
        return
    if kind == "channels":
        raise ConfigError(f"models.teacher.init_from: {teacher.init_from} takes the image as input channels "
                          "(Wan2.1-I2V, Wan2.2-I2V-A14B): not supported yet (docs/i2v.md)")
    if not cfg.method.first_frame_given:
        raise ConfigError(f"the teacher {teacher.init_from} continues a given first frame (expand_timesteps): set "
                          "method.first_frame_given: true")
    image_paths(cfg)


def image_paths(cfg):
    """Every sample's image file, in order, each header read; ConfigError naming the first sample without a
    readable one (before anything is written)."""
    paths = []
    for i, (_, image) in enumerate(prompt_rows(cfg)):
        if image is None:
            raise ConfigError(f"data.prompts: sample {i} of {cfg.data.prompts} names no image, and the teacher "
                              "is image-conditioned")
        if not os.path.isfile(image):
            raise ConfigError(f"data.prompts: sample {i}'s image {image} does not exist")
        open_image(image, i).close()
        paths.append(image)
    return paths


def open_image(path, index):
    """The PIL image of sample `index`, its header read; ConfigError naming the sample if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigError(f"data.prompts: sample {index}'s image {path} is unreadable ({one_line(e)})") from None


def load_image(path, index):
    """The PIL image of sample `index` in RGB; ConfigError naming the sample if it cannot be decoded."""
    try:
        with open_image(path, index) as image:
            return image.convert("RGB")
    except OSError as e:  # a truncated file passes the header and fails here
        raise ConfigError(f"data.prompts: sample {index}'s image {path} is unreadable ({one_line(e)})") from None


@torch.no_grad()
def image_latents(vae, paths, height, width, device):
    """{index: latent [1, C, 1, h, w] fp32} of each image: prepared as WanImageToVideoPipeline prepares it, then
    the mode of the VAE's latent distribution, normalised as the transformer sees latents."""
    from diffusers.video_processor import VideoProcessor

    processor = VideoProcessor(vae_scale_factor=vae.config.scale_factor_spatial)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=device).view(shape)
    std = torch.tensor(vae.config.latents_std, device=device).view(shape)
    latents = {}
    for index, path in paths.items():
        pixels = processor.preprocess(load_image(path, index), height=height, width=width)  # [1, 3, H, W]
        z = vae.encode(pixels.to(device, torch.float32)[:, :, None]).latent_dist.mode()  # [1, C, 1, h, w]
        latents[index] = ((z - mean) / std).float()
    return latents


class FirstFrame:
    """Wan2.2-TI2V's conditioning for the teacher's ODE: the model sees the first latent frame replaced by the
    image's clean latent `latent` [B, C, 1, H, W], at timestep 0 on its tokens (diffusers' expand_timesteps)."""

    def __init__(self, latent, patch_size):
        self.latent, self.patch_size = latent, patch_size

    def blend(self, x):
        """x [B, C, F, H, W] with its first frame the image latent."""
        return torch.cat([self.latent.to(x.dtype).expand(len(x), -1, -1, -1, -1), x[:, :, 1:]], dim=2)

    def timesteps(self, x, t):
        """Per token [L]: 0 for the first frame's tokens, t for the others."""
        _, p_h, p_w = self.patch_size
        per_frame = (x.shape[3] // p_h) * (x.shape[4] // p_w)
        return torch.cat([torch.zeros(per_frame), torch.full(((x.shape[2] - 1) * per_frame,), float(t))]).to(x.device)
