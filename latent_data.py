"""A folder of your own VAE latents with prompts -> a clean-data cache: stage 1's data and stage 2a's context.

    python latent_data.py configs/wan_ar.yaml LATENTS_DIR [key.path=value ...]
    torchrun --nproc_per_node=8 latent_data.py configs/wan_ar.yaml LATENTS_DIR

LATENTS_DIR holds each video as two files of one name: NAME.safetensors, one tensor `latents` [C, F, H, W] (or
[1, C, F, H, W]), the Wan VAE's latent of the video normalised as the transformer sees it ((z - latents_mean) /
latents_std with the VAE config's values; what WanPipeline returns with output_type="latent"), and NAME.txt, its
prompt. The samples are the pairs in name order (the first data.num_samples if that is set).

The cache (method.teacher_path_cache) holds per sample that latent as its x0 and no trajectory, the prompt
encoded by models.student.init_from's UMT5 as generation encodes it, checksums and atomic files; resumable, each
rank taking its stride. Its fingerprint says "clean_data": ar_diffusion.py trains on it and generate_cache.py takes
it as method.context_cache (causal ODE); kd.py, kd_causal.py and causal_ode.py refuse it. Every name, prompt and
tensor header is checked before anything is written.
"""

import hashlib
import os
import sys

import torch
from safetensors import safe_open

from cache_format import CACHE_FORMAT_VERSION, prompts_sha256, sample_path, write_sample
from config import CACHE_DTYPES, check_paths, config_from_argv, latent_shape
from distributed import init_distributed, shutdown_distributed
from errors import CacheError, ConfigError, one_line, run_cli
from generate_cache import mark_complete, missing_samples, open_for_writing
from lmdb_pairs import check_encoder_dir
from models import load_text_encoder
from teacher import encode_prompt


def latent_files(folder, limit):
    """[(NAME.safetensors path, prompt)] in name order, the first `limit` (None: all); ConfigError naming the
    file for a latent without its prompt file or with an empty prompt."""
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder} is not a directory (expected NAME.safetensors latents with NAME.txt prompts)")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not names:
        raise ConfigError(f"{folder} holds no .safetensors latents")
    if limit is not None and len(names) < limit:
        raise ConfigError(f"data.num_samples={limit} but {folder} holds {len(names)} latent files")
    pairs = []
    for name in names[:limit]:
        text = os.path.join(folder, name.removesuffix(".safetensors") + ".txt")
        try:
            with open(text, encoding="utf-8") as f:
                prompt = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{text}: the prompt of {name} is unreadable ({one_line(e)})") from None
        if not prompt:
            raise ConfigError(f"{text}: the prompt of {name} is empty")
        pairs.append((os.path.join(folder, name), prompt))
    return pairs


def check_latent_header(path, shape):
    """ConfigError naming the file unless it holds a tensor `latents` of `shape` [C, F, H, W] (or [1, ...])."""
    try:
        with safe_open(path, framework="pt") as f:
            if "latents" not in f.keys():
                raise ConfigError(f"{path}: no tensor 'latents' (found {sorted(f.keys())})")
            found = list(f.get_slice("latents").get_shape())
    except ConfigError:
        raise
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        raise ConfigError(f"{path}: unreadable ({type(e).__name__}: {one_line(e)})") from None
    if found not in (shape, [1, *shape]):
        raise ConfigError(f"{path}: latents of shape {found}, expected {shape} [C, F, H, W] for pipeline.num_frames/"
                          "height/width and the student's VAE")


def read_latent(path, shape, dtype):
    """latents [C, F, H, W] of one file in the cache dtype; CacheError naming it if not finite there."""
    with safe_open(path, framework="pt") as f:
        latents = f.get_tensor("latents").reshape(shape).to(dtype)
    if not torch.isfinite(latents).all():
        raise CacheError(f"{path}: latents are not finite in {dtype}; nothing was written for it")
    return latents


def data_fingerprint(cfg, folder, pairs, shape):
    """What the data cache was made from: the video size and dtype kd's configs compare, the files it read."""
    p = cfg.pipeline
    listing = "\n".join(f"{os.path.basename(path)} {os.path.getsize(path)}" for path, _ in pairs)
    return {"format_version": CACHE_FORMAT_VERSION, "clean_data": True, "num_frames": p.num_frames,
            "height": p.height, "width": p.width, "max_sequence_length": p.max_sequence_length,
            "latent_shape": shape, "timesteps": [0.0], "causal_ode": False, "num_samples": len(pairs),
            "prompts_sha256": prompts_sha256([prompt for _, prompt in pairs]), "dtype": cfg.data.cache_dtype,
            "source": {"latents": os.path.abspath(folder),
                       "files_sha256": hashlib.sha256(listing.encode()).hexdigest()}}


def import_latents(cfg, folder, rank=0, world_size=1, device=torch.device("cpu")):
    """Complete cfg's cache from a latent folder, all ranks together (call on every rank); the number written."""
    if cfg.data.prompts:
        raise ConfigError(f"data.prompts={cfg.data.prompts}: the prompts are {folder}'s .txt files; set "
                          "data.prompts=null")
    model_dir = cfg.models.student.init_from
    check_encoder_dir(model_dir)
    shape = latent_shape(model_dir, cfg)  # [C, F, H, W]
    pairs = latent_files(folder, cfg.data.num_samples)
    for path, _ in pairs:
        check_latent_header(path, shape)
    fingerprint = data_fingerprint(cfg, folder, pairs, shape)
    cache_dir = cfg.method.teacher_path_cache
    open_for_writing(cache_dir, fingerprint, rank)
    missing = missing_samples(cache_dir, fingerprint, rank, world_size)
    mine = missing[rank::world_size]
    if mine:
        encoder, tokenizer = load_text_encoder(model_dir, device)
        dtype = CACHE_DTYPES[cfg.data.cache_dtype]
        for i in mine:
            path, prompt = pairs[i]
            latents = read_latent(path, shape, dtype)[None]  # [1, C, F, H, W]: x0 only
            embeds = encode_prompt(encoder, tokenizer, prompt, cfg.pipeline.max_sequence_length, device).to(dtype)
            write_sample(sample_path(cache_dir, i), latents, torch.zeros(1), embeds,
                         {"prompt": prompt, "index": i, "format_version": CACHE_FORMAT_VERSION,
                          "latents_file": os.path.basename(path)})
    mark_complete(cache_dir, [sample_path(cache_dir, i) for i in range(len(pairs))], len(pairs), rank)
    return len(missing)


def main(argv):
    """latent_data.py CONFIG.yaml LATENTS_DIR [key.path=value ...] (every rank)."""
    if len(argv) < 2 or argv[1].startswith("-") or "=" in argv[1]:
        raise ConfigError("usage: latent_data.py CONFIG.yaml LATENTS_DIR [key.path=value ...]")
    folder = argv[1]
    cfg = config_from_argv([argv[0], *argv[2:]])
    check_paths(cfg)
    rank, world_size, device = init_distributed()
    written = import_latents(cfg, folder, rank, world_size, device)
    if rank == 0:
        print(f"cache {cfg.method.teacher_path_cache} complete: {written} latents imported from {folder} on "
              f"{world_size} rank(s)")
    shutdown_distributed()


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
