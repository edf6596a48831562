"""The trajectory cache on disk, shared by its writer (generate_cache.py) and its reader (kd.py's dataset).

    <cache>/samples/{index:08d}.safetensors  latents [K+1, C, F, H, W]: the recorded states, then x0;
                                             timesteps [K+1] fp32, 0 last; prompt_embeds [L, D] (real tokens);
                                             an image-channel teacher's condition and image_embeds (i2v.py)
    <cache>/negative_prompt_embeds.safetensors  prompt_embeds [L, D] of the CFG negative prompt
    <cache>/metadata.json                    the fingerprint: what the cache was made from
    <cache>/COMPLETE                         written once every sample exists

Each file's metadata holds CRC32 checksums of every (state, latent frame) slice of `latents`, of `timesteps`,
of `prompt_embeds` and of the other metadata, so that the dataset verifies exactly the slices it reads and a
resumed generation the whole file. Every file is written atomically (atomic_files.py).
"""

import hashlib
import json
import os
import zlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from atomic_files import write_atomic
from config import latent_shape, read_prompts
from errors import CacheError, one_line
from flow_matching import teacher_grid
from i2v import IMAGE_TENSORS, conditioning
from teacher import teacher_experts, teacher_solver

CACHE_FORMAT_VERSION = 2  # 2: per-slice CRC32 checksums in each sample file's metadata
REGENERATE_HINT = "rerun generate_cache.py with the same config to regenerate it"
SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def sample_path(cache_dir, index):
    """The file of sample `index`."""
    return os.path.join(cache_dir, "samples", f"{index:08d}.safetensors")


def negative_embeds_path(cache_dir):
    """The file of the CFG negative prompt's embeddings."""
    return os.path.join(cache_dir, "negative_prompt_embeds.safetensors")


def prompts_sha256(prompts):
    """SHA-256 of the prompts, one per line."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def cache_fingerprint(cfg, prompts=None, shape=None):
    """What a cache was made from; a cache whose fingerprint differs from the config's is refused.

    Fields that cannot be known (no prompts file, no teacher to read the latent shape from) are None and not
    compared.
    """
    m, p = cfg.method, cfg.pipeline
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "teacher": cfg.models.teacher.init_from if cfg.models.teacher else None,
        "teacher_inference_steps": m.teacher_inference_steps,
        "teacher_guidance_scale": m.teacher_guidance_scale,
        **teacher_solver(cfg),  # euler or unipc, and UniPC's order and corrector settings
        **teacher_experts(cfg),  # which experts ran, where they switched, the low-noise expert's guidance
        "teacher_negative_prompt": m.teacher_negative_prompt,
        "flow_shift": p.flow_shift,
        "num_frames": p.num_frames,
        "height": p.height,
        "width": p.width,
        "max_sequence_length": p.max_sequence_length,
        "causal_ode": causal_ode(cfg),  # False, or an AR teacher's block size and its context cache
        "clean_data": False,  # True: latent_data.py's cache of the user's own latents, x0 only
        "conditioning": conditioning(cfg),  # "text", or an image-conditioned teacher's kind and its images
        "latent_shape": list(shape) if shape is not None else None,
        "timesteps": teacher_grid(cfg).timesteps,
        "num_samples": len(prompts) if prompts is not None else cfg.data.num_samples,
        "prompts_sha256": prompts_sha256(prompts) if prompts is not None else None,
        "seed": cfg.data.seed,
        "dtype": cfg.data.cache_dtype,
    }


# Fingerprint fields added after format 2, with the value that every cache written before them had
ADDED_FIELDS = {"teacher_experts": ["transformer"], "teacher_solver": "euler", "causal_ode": False,
                "clean_data": False, "conditioning": "text"}
# What a clean-data cache (latent_data.py) records and a reader compares: the data; it has no teacher or grid
CLEAN_DATA_FIELDS = ("format_version", "num_frames", "height", "width", "max_sequence_length", "latent_shape",
                     "num_samples", "prompts_sha256", "dtype")


def causal_ode(cfg):
    """False for a bidirectional teacher's cache; for causal ODE (method.context_cache) the block size and the
    SHA-256 of the context cache's metadata.json (a context regenerated differently makes this cache stale).
    A causal ODE cache's files hold one more state after x0: the clean context latent."""
    context = cfg.method.context_cache
    if context is None:
        return False
    with open(os.path.join(context, "metadata.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"frames_per_block": cfg.method.num_frames_per_block, "context_sha256": digest}


def fingerprint_differences(expected, found):
    """'field: config X, cache Y' for every differing field (None on either side: unknown, not compared; an
    imported cache cannot know its guidance scale, negative prompt or seed)."""
    lines = []
    keys = set(expected) | set(found)
    if found.get("clean_data") and expected.get("clean_data") is None:  # a reader: the trainer decides
        keys = CLEAN_DATA_FIELDS
    for key in sorted(keys):
        if expected.get(key) is None or (key in found and found[key] is None):
            continue
        cached = found.get(key, ADDED_FIELDS.get(key))
        if expected.get(key) != cached:
            lines.append(f"  {key}: config {expected.get(key)!r}, cache {cached!r}")
    return lines


def check_cache_metadata(cache_dir, expected):
    """Refuse a cache made from a different config; the stored metadata, or None if there is none yet."""
    path = os.path.join(cache_dir, "metadata.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError) as e:
        raise CacheError(f"{path} is unreadable ({e}); delete the cache directory to regenerate it") from None
    diff = fingerprint_differences(expected, found)
    if diff:
        raise CacheError(
            f"trajectory cache {cache_dir} was made with a different configuration:\n" + "\n".join(diff)
            + "\nuse another method.teacher_path_cache or delete this one to regenerate it"
        )
    return found


def crc32(tensor):
    """CRC32 of a tensor's bytes in row-major order."""
    return zlib.crc32(tensor.contiguous().view(torch.uint8).numpy())


def frame_checksums(latents):
    """CRC32 of each (state, latent frame) slice of latents [K+1, C, F, H, W]: K+1 lists of F ints."""
    return [[crc32(latents[k, :, f]) for f in range(latents.shape[2])] for k in range(latents.shape[0])]


def metadata_crc(metadata):
    """CRC32 of a cache file's metadata strings, its own entry excluded."""
    rest = {k: v for k, v in metadata.items() if k != "crc32_metadata"}
    return str(zlib.crc32(json.dumps(rest, sort_keys=True).encode("utf-8")))


def checksummed_metadata(tensors, info):
    """Safetensors metadata for a cache file: `info` plus a CRC32 per tensor (per (state, frame) slice for
    `latents`) and one over the metadata itself, all strings."""
    metadata = {k: str(v) for k, v in info.items()}
    for name, tensor in tensors.items():
        per_slice = name == "latents"
        metadata[f"crc32_{name}"] = json.dumps(frame_checksums(tensor)) if per_slice else str(crc32(tensor))
    metadata["crc32_metadata"] = metadata_crc(metadata)
    return metadata


def verified_metadata(metadata, path):
    """A cache file's metadata after its own checksum (CacheError if it has none or it fails)."""
    if "crc32_metadata" not in metadata:
        raise CacheError(f"cache file {path} has no checksums (written by an older version, or damaged); "
                         f"{REGENERATE_HINT}")
    if metadata_crc(metadata) != metadata["crc32_metadata"]:
        raise CacheError(f"cache file {path} is corrupt: its metadata fails its CRC32 checksum; "
                         f"{REGENERATE_HINT}")
    return metadata


def verified_tensor(tensor, expected, path, what):
    """`tensor`, after checking its bytes against the stored CRC32 `expected` (CacheError naming the file)."""
    if crc32(tensor) != int(expected):
        raise CacheError(f"cache file {path} is corrupt: {what} fails its CRC32 checksum; {REGENERATE_HINT}")
    return tensor


def read_verified(path, read, what="cache file"):
    """read(f, metadata) of the safetensors file at `path` open as f, its metadata checksum-verified; any failure
    to read it becomes one CacheError naming the file (safetensors raises several types for truncated or garbled
    files)."""
    try:
        with safe_open(path, framework="pt") as f:
            return read(f, verified_metadata(f.metadata() or {}, path))
    except CacheError:
        raise
    except Exception as e:
        raise CacheError(f"cannot read {what} {path}: {type(e).__name__}: {one_line(e)}; "
                         f"{REGENERATE_HINT}") from None


def read_negative_embeds(cache_dir):
    """prompt_embeds [L, D] of the CFG negative prompt, CRC32-verified (CacheError naming the file)."""
    path = negative_embeds_path(cache_dir)
    return read_verified(path, lambda f, metadata: verified_tensor(
        f.get_tensor("prompt_embeds"), metadata["crc32_prompt_embeds"], path, "prompt_embeds"))


def read_x0(cache_dir, index):
    """(x0 [C, F, H, W], prompt) of cached sample `index`: its last teacher state, every frame CRC32-verified
    (CacheError naming the file). A causal ODE cache's x0 is the entry before its context."""
    path = sample_path(cache_dir, index)

    def read(f, metadata):
        crcs = json.loads(metadata["crc32_latents"])  # [states][F]
        position = f.get_slice("timesteps").get_shape()[0] - 1  # x0 follows the recorded states
        x0 = f.get_slice("latents")[position]
        for frame in range(x0.shape[1]):
            verified_tensor(x0[:, frame], crcs[position][frame], path, f"latents[{position}, :, {frame}]")
        return x0, metadata["prompt"]

    return read_verified(path, read)


def read_prompt(cache_dir, index):
    """The prompt of cached sample `index`, from its checksummed metadata (CacheError naming the file)."""
    return read_verified(sample_path(cache_dir, index), lambda f, metadata: metadata["prompt"])


def negative_embeds_problem(cache_dir):
    """Why the negative prompt's embeddings file is unusable, or None."""
    try:
        read_negative_embeds(cache_dir)
    except CacheError as e:
        return str(e)
    return None


def image_tensors(fingerprint):
    """The I2V inputs a sample file of this cache holds: an image-channel teacher's condition and CLIP tokens."""
    image = fingerprint.get("conditioning")
    if not isinstance(image, dict) or image["kind"] != "channels":
        return ()
    return IMAGE_TENSORS if image["clip"] else IMAGE_TENSORS[:1]  # the CLIP tokens come second


def sample_file_problem(path, fingerprint, index):
    """Why the cached sample at `path` is unusable, or None if its header and shapes match the fingerprint."""
    k1 = len(fingerprint["timesteps"]) + bool(fingerprint.get("causal_ode"))  # causal: + the context latent
    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            if keys != {"latents", "timesteps", "prompt_embeds", *image_tensors(fingerprint)}:
                return f"tensors {sorted(keys)}"
            meta = f.metadata() or {}
            if meta.get("index") != str(index):
                return f"metadata index {meta.get('index')!r}, expected {index}"
            latents = f.get_slice("latents")
            want = [k1] + list(fingerprint["latent_shape"])
            if list(latents.get_shape()) != want:
                return f"latents shape {latents.get_shape()}, expected {want}"
            if latents.get_dtype() != SAFETENSORS_DTYPES[fingerprint["dtype"]]:
                return f"latents dtype {latents.get_dtype()}"
            if f.get_tensor("timesteps").tolist() != fingerprint["timesteps"]:
                return "recorded timesteps differ"
            emb = f.get_slice("prompt_embeds").get_shape()
            if len(emb) != 2 or not 0 < emb[0] <= fingerprint["max_sequence_length"]:
                return f"prompt_embeds shape {emb}"
            stored = json.loads(verified_metadata(meta, path)["crc32_latents"])
            if frame_checksums(f.get_tensor("latents")) != stored:
                return "latents fail their CRC32 checksums"
            if crc32(f.get_tensor("timesteps")) != int(meta["crc32_timesteps"]):
                return "timesteps fail their CRC32 checksum"
            for name in ("prompt_embeds", *image_tensors(fingerprint)):
                if crc32(f.get_tensor(name)) != int(meta[f"crc32_{name}"]):
                    return f"{name} fail their CRC32 checksum"
    except CacheError as e:
        return str(e)
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        return f"unreadable ({type(e).__name__}: {one_line(e)})"
    return None


def open_cache(cfg):
    """The metadata of cfg's complete, matching cache (CacheError if incomplete or made differently)."""
    cache_dir = cfg.method.teacher_path_cache
    if not os.path.exists(os.path.join(cache_dir, "COMPLETE")):
        raise CacheError(
            f"Teacher path cache at {cache_dir} is incomplete and no teacher model is configured; "
            "add a 'teacher' entry under 'models:' or provide a complete cache"
        )
    prompts = read_prompts(cfg) if cfg.data.prompts else None
    shape = latent_shape(cfg.models.teacher.init_from, cfg) if cfg.models.teacher else None
    # clean_data unset: a clean-data cache is compared on its data, and the trainer accepts it or not
    meta = check_cache_metadata(cache_dir, {**cache_fingerprint(cfg, prompts, shape), "clean_data": None})
    if meta is None:
        raise CacheError(f"{cache_dir} has COMPLETE but no metadata.json; delete it to regenerate the cache")
    absent = [sample_path(cache_dir, i) for i in range(meta["num_samples"])
              if not os.path.exists(sample_path(cache_dir, i))]
    if absent:
        more = ", ..." if len(absent) > 3 else ""
        raise CacheError(f"{len(absent)} cached sample file(s) are missing ({', '.join(absent[:3])}{more}); "
                         "rerun generate_cache.py with the same config to regenerate them")
    return meta


def write_sample(path, latents, timesteps, prompt_embeds, info, image=None):
    """One sample file; its metadata is `info` plus the CRC32 checksums the dataset verifies. image: an I2V
    teacher's per-sample inputs ({"condition": [T + C, F, H, W], "image_embeds": [tokens, D]}), stored too."""
    tensors = {"latents": latents.contiguous(), "timesteps": timesteps,
               "prompt_embeds": prompt_embeds.contiguous(), **{k: v.contiguous() for k, v in (image or {}).items()}}
    metadata = checksummed_metadata(tensors, info)
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_negative_embeds(cache_dir, embeds, prompt):
    """The CFG negative prompt's embeddings [L, D] with checksums (read back for the K-step references)."""
    tensors = {"prompt_embeds": embeds.contiguous()}
    metadata = checksummed_metadata(tensors, {"prompt": prompt})
    write_atomic(negative_embeds_path(cache_dir), lambda tmp: save_file(tensors, tmp, metadata))
