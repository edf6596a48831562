"""Image-to-video conditioning: the one module the teacher and the cache call for it (docs/i2v.md).

A teacher directory says what it is conditioned on:
- "text": a text-to-video Wan (Wan2.1-T2V, Wan2.2-T2V-A14B);
- "first_frame": Wan2.2-TI2V-5B, whose model_index.json sets expand_timesteps. diffusers' WanImageToVideoPipeline
  replaces the first latent frame of the model's input by the image's clean latent at every step and gives its
  tokens timestep 0; the ODE steps the whole latent, and the result's first frame is the image latent again;
- "channels": Wan2.1-I2V and Wan2.2-I2V-A14B: the model takes a 4-channel mask and the latent of the image
  followed by zero frames as extra input channels, and (Wan2.1) the image's CLIP tokens; the state is the noisy
  latent alone, and the result's first frame is the teacher's rendering of the image.

The images come from data.prompts (JSONL or CSV with prompt and image columns: config.prompt_rows), prepared as
the pipeline prepares them (diffusers' VideoProcessor: resized to pipeline.height x width, scaled to [-1, 1])
and encoded by the teacher's VAE (the mode of its latent distribution, normalised by the VAE config's
latents_mean and latents_std). A student of such a teacher's pairs either continues the first frame of each x0
(method.first_frame_given; for Wan2.2-TI2V that frame is the image latent) or, with the image-channel teacher's
own architecture, takes the same channels and CLIP tokens, which its sample files keep (stored, student_channels).
"""

import hashlib
import os

import torch

from config import prompt_rows
from errors import ConfigError, one_line
from models import load_vae, pipeline_index


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
    fingerprint = {"kind": kind, "images_sha256": digest.hexdigest()}
    if kind == "channels":  # its samples also hold the condition channels and (clip) the CLIP tokens
        from diffusers import WanTransformer3DModel

        config = WanTransformer3DModel.load_config(cfg.models.teacher.init_from, subfolder="transformer")
        fingerprint.update(clip=config.get("image_dim") is not None,
                           condition_channels=config["in_channels"] - config["out_channels"])
    return fingerprint


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
    same_architecture = kind == "channels" and teacher_conditioning(cfg.models.student.init_from) == "channels"
    if not cfg.method.first_frame_given and not same_architecture:  # (that student takes the image's channels)
        how = "expand_timesteps" if kind == "first_frame" else "the image as input channels"
        raise ConfigError(f"the teacher {teacher.init_from} continues a given image ({how}): set "
                          "method.first_frame_given: true (the student continues the first frame of its x0)")
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


def image_conditions(cfg, indices, dtype, device):
    """{index: FirstFrame or Channels} of the samples `indices` ({} for a text teacher): image_conditioner's."""
    condition = image_conditioner(cfg, dtype, device) if indices else None
    return {} if condition is None else {i: condition(i) for i in indices}


def image_conditioner(cfg, dtype, device):
    """index -> FirstFrame or Channels of that sample's image for an image-conditioned teacher (None for a text
    one): the image encoded as WanImageToVideoPipeline encodes it, then rounded through the cache dtype `dtype`
    (so that a first frame is exactly the one the student will read). Its VAE (and CLIP tower) stay loaded while
    it lives, as they do in the pipeline; one sample's conditioning exists at a time."""
    init_from = cfg.models.teacher.init_from
    kind = teacher_conditioning(init_from)
    if kind == "text":
        return None
    from diffusers import WanTransformer3DModel

    paths, p = image_paths(cfg), cfg.pipeline
    vae, config = load_vae(init_from, device), WanTransformer3DModel.load_config(init_from, subfolder="transformer")
    clip = clip_encoder(init_from, device) if kind == "channels" and config.get("image_dim") else None

    def condition(i):
        image = load_image(paths[i], i)
        if kind == "first_frame":
            return FirstFrame(encoded(vae, pixels(vae, image, p), device).to(dtype).float(), config["patch_size"])
        first = pixels(vae, image, p)[:, :, None]  # [1, 3, 1, H, W]
        video = torch.cat([first, first.new_zeros(1, 3, p.num_frames - 1, p.height, p.width)], dim=2)
        latent = encoded(vae, video, device)  # [1, C, F, h, w]: the image, then what zero frames encode to
        embeds = clip(image) if clip is not None else None
        return Channels(torch.cat([first_frame_mask(latent, vae), latent], dim=1).to(dtype).float(),
                        None if embeds is None else embeds.to(dtype).float())

    return condition


def pixels(vae, image, p):
    """[1, 3, H, W] in [-1, 1]: the image as the pipeline prepares it (VideoProcessor.preprocess)."""
    from diffusers.video_processor import VideoProcessor

    return VideoProcessor(vae_scale_factor=vae.config.scale_factor_spatial).preprocess(image, height=p.height,
                                                                                      width=p.width)


@torch.no_grad()
def encoded(vae, video, device):
    """The normalised latent [1, C, f, h, w] fp32 of pixels [1, 3, F, H, W] (or [1, 3, H, W]: one frame): the mode
    of the VAE's latent distribution, (z - latents_mean) / latents_std as the transformer sees latents."""
    video = video if video.dim() == 5 else video[:, :, None]
    z = vae.encode(video.to(device, torch.float32)).latent_dist.mode()
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=device).view(shape)
    std = torch.tensor(vae.config.latents_std, device=device).view(shape)
    return ((z - mean) / std).float()


def first_frame_mask(latent, vae):
    """[1, T, F, h, w] (T: the VAE's temporal factor, 4): Wan I2V's mask channels, 1 where the pixel frames of
    the given image lie (the first latent frame) and 0 elsewhere."""
    t = vae.config.scale_factor_temporal
    mask = torch.zeros_like(latent[:, :1]).repeat(1, t, 1, 1, 1)
    mask[:, :, 0] = 1
    return mask


def clip_encoder(init_from, device):
    """image -> [1, tokens, D] fp32: the second-to-last hidden states of the teacher's CLIP vision tower, as
    WanImageToVideoPipeline.encode_image computes them (its processor on the image as given)."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(init_from, subfolder="image_encoder").to(device).eval()
    processor = CLIPImageProcessor.from_pretrained(init_from, subfolder="image_processor")

    @torch.no_grad()
    def encode(image):
        inputs = processor(images=image, return_tensors="pt").to(device)
        return model(**inputs, output_hidden_states=True).hidden_states[-2].float()

    return encode


class FirstFrame:
    """Wan2.2-TI2V's conditioning of the teacher's ODE: the model sees the first latent frame replaced by the
    image's clean latent `latent` [1, C, 1, H, W], at timestep 0 on its tokens (diffusers' expand_timesteps); the
    states are recorded as the model sees them."""

    image_embeds = None

    def __init__(self, latent, patch_size):
        self.latent, self.patch_size = latent, patch_size

    def state(self, x):
        """x [B, C, F, H, W] with its first frame the image latent."""
        return torch.cat([self.latent.to(x.dtype).expand(len(x), -1, -1, -1, -1), x[:, :, 1:]], dim=2)

    model_input = state

    def timesteps(self, x, t):
        """Per token [L]: 0 for the first frame's tokens, t for the others."""
        _, p_h, p_w = self.patch_size
        per_frame = (x.shape[3] // p_h) * (x.shape[4] // p_w)
        return torch.cat([torch.zeros(per_frame), torch.full(((x.shape[2] - 1) * per_frame,), float(t))]).to(x.device)


IMAGE_TENSORS = ("condition", "image_embeds")  # what a sample file of an image-channel teacher also holds


def stored(image):
    """What a sample file keeps of an image conditioning for the student: an image-channel teacher's condition
    [T + C, F, h, w] and CLIP tokens [tokens, D] (FirstFrame: nothing, x0's first frame is the image latent)."""
    if not isinstance(image, Channels):
        return {}
    return {"condition": image.condition[0], **({} if image.image_embeds is None
                                                else {"image_embeds": image.image_embeds[0]})}


def student_channels(item, device):
    """The Channels conditioning of a dataset item or batch of an image-channel teacher's cache, else None."""
    if "condition" not in item:
        return None
    condition, embeds = item["condition"], item.get("image_embeds")
    condition = condition if condition.dim() == 5 else condition[None]  # [B, T + C, F, h, w]
    embeds = None if embeds is None else (embeds if embeds.dim() == 3 else embeds[None]).to(device).float()
    return Channels(condition.to(device).float(), embeds)


class Channels:
    """Wan2.1-I2V's and Wan2.2-I2V-A14B's conditioning: the model takes `condition` [1, T + C, F, h, w] (the mask
    and the latent of the image followed by zero frames) as extra input channels after the noisy latent, and the
    image's CLIP tokens `image_embeds` [1, tokens, D] if it has an image embedder (Wan2.1); the state is the
    noisy latent alone."""

    def __init__(self, condition, image_embeds):
        self.condition, self.image_embeds = condition, image_embeds

    def state(self, x):
        return x

    def model_input(self, x):
        """x [B, C, f, H, W] (the first f frames of the video) with the condition's channels of those frames."""
        condition = self.condition[:, :, : x.shape[2]].to(x.dtype)
        return torch.cat([x, condition.expand(len(x), -1, -1, -1, -1)], dim=1)

    def timesteps(self, x, t):
        return t
