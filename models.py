"""The diffusers Wan components, loaded with from_pretrained from a hub id or a local diffusers directory.

Trainable parameters stay fp32 (one dtype for FSDP2); GPU compute runs in bf16 (autocast or bf16 weights).
"""

import os

import torch


def compute_dtype(device):
    """bf16 on GPU, fp32 on CPU (where bf16 matmuls are slow and tests want exact arithmetic)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device):
    """bf16 autocast on GPU; a no-op on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def load_transformer(init_from, device, dtype=torch.float32, subfolder="transformer"):
    """The WanTransformer3DModel of `init_from`'s `subfolder` (transformer/, or a Wan2.2 transformer_2/)."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(init_from, subfolder=subfolder, torch_dtype=dtype)
    return model.to(device)


def pipeline_index(init_from):
    """The model directory's (or hub id's) model_index.json as a dict: its components and pipeline config; {}
    for a local directory without one (a bare transformer/, text_encoder/, ... layout)."""
    from diffusers import DiffusionPipeline

    if os.path.isdir(init_from) and not os.path.exists(os.path.join(init_from, "model_index.json")):
        return {}
    return DiffusionPipeline.load_config(init_from)


def has_second_expert(index):
    """Whether a model_index.json names a transformer_2 (Wan2.2's low-noise expert); Wan2.1 has none."""
    return (index.get("transformer_2") or [None, None])[-1] is not None


def load_text_encoder(init_from, device):
    """UMT5 encoder (bf16 on GPU, fp32 on CPU, eval mode) and its tokenizer."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(init_from, subfolder="tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(init_from, subfolder="text_encoder",
                                               torch_dtype=compute_dtype(device))
    return encoder.to(device).eval(), tokenizer


def has_vae(init_from):
    """Whether the model directory (or hub id) has a vae/ component to decode previews with."""
    from diffusers import AutoencoderKLWan

    if os.path.isdir(init_from):
        return os.path.exists(os.path.join(init_from, "vae", "config.json"))
    try:
        AutoencoderKLWan.load_config(init_from, subfolder="vae")
    except OSError:
        return False
    return True


def load_vae(init_from, device):
    """The model directory's AutoencoderKLWan, fp32 (as WanPipeline decodes), eval mode."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):  # loading must not move the training RNG (bit-exact resumes)
        vae = AutoencoderKLWan.from_pretrained(init_from, subfolder="vae", torch_dtype=torch.float32)
    return vae.to(device).eval()
