"""ODE-init knowledge distillation of Wan video diffusion models.

A many-step teacher's flow-matching ODE trajectories are cached to disk once (generate_cache.py); a few-step
student learns by MSE to predict the teacher's final clean latent from the cached states at its `t_list`
timesteps. The exported student is the `ode_init` initialisation for Self-Forcing.

This file holds what every other script imports: config loading, the flow-matching helpers, model loading
(including offline tiny Wan models), the trajectory-cache format and the distributed set-up.

    python generate_cache.py configs/tiny.yaml                                  # one process
    torchrun --standalone --nproc_per_node=2 generate_cache.py configs/tiny.yaml
    torchrun --nproc_per_node=8 generate_cache.py configs/wan.yaml method.teacher_guidance_scale=6

Overrides after the config file are dotted keys whose values are parsed as YAML.
"""

import difflib
import hashlib
import json
import os
import shutil
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import yaml


# ----------------------------------------------------------------------------------------------------------
# Config: every option, its default and its meaning, in one place.


class Opt:
    """A field that defaults to None and otherwise must have type `kind`."""

    def __init__(self, kind):
        self.kind = kind


WAN_NEGATIVE_PROMPT = (  # Wan2.1's default negative prompt, as used by its pipelines and by Self-Forcing
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)

DEFAULTS = {
    "models": {
        "student": {  # required: the few-step model being distilled
            "init_from": Opt(str),  # hub id or local diffusers directory (transformer/ subfolder)
            "trainable": True,  # must be true
        },
        "teacher": {  # optional once the cache is complete; writes the trajectory cache
            "init_from": Opt(str),  # hub id or local diffusers directory (transformer/, text_encoder/, tokenizer/, vae/)
            "trainable": False,  # must be false
        },
    },
    "method": {
        "teacher_path_cache": Opt(str),  # directory of the trajectory cache (created if missing)
        "t_list": [999, 937, 833, 624, 0],  # student timesteps (0..1000), strictly decreasing, ending at 0
        "student_sample_steps": Opt(int),  # number of student steps; defaults to len(t_list) - 1
        "teacher_guidance_scale": 1.0,  # classifier-free guidance g: uncond + g * (cond - uncond); 1 = no CFG
        "teacher_inference_steps": 48,  # Euler steps of the teacher's ODE
        "teacher_negative_prompt": WAN_NEGATIVE_PROMPT,  # the unconditional prompt of CFG
        "num_frames_per_block": 3,  # latent frames sharing one noise level (causal students)
        "t_list_tolerance": 1.0,  # max distance, in timesteps, between a t_list entry and its teacher grid point
        "keep_full_trajectory": False,  # cache every teacher state, not only those at t_list (bigger files)
    },
    "pipeline": {
        "flow_shift": 5.0,  # s in sigma' = s*sigma / (1 + (s-1)*sigma); Wan uses 5 at 480p
        "num_frames": 81,  # video frames (latent frames = (num_frames - 1) / vae temporal factor + 1)
        "height": 480,  # pixels
        "width": 832,  # pixels
        "max_sequence_length": 512,  # text tokens the teacher sees (prompt padded with zeros to this)
    },
    "data": {
        "prompts": Opt(str),  # text file, one prompt per line, blank lines skipped; sample i = prompt i
        "num_samples": Opt(int),  # use the first N prompts; default all
        "seed": 0,  # sample i's initial noise is drawn from seed + i
        "cache_dtype": "bfloat16",  # dtype of cached latents and prompt embeddings
    },
}

OPTIONAL_SECTIONS = ("models.student", "models.teacher")  # absent from the YAML means the role is absent
CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ConfigError(ValueError):
    """A config field is missing, unknown, of the wrong type or out of range."""


class CacheError(ValueError):
    """The trajectory cache is missing, stale or unreadable."""


class Config(dict):
    """A dict whose keys also read as attributes: cfg.method.t_list."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _type_name(kind):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}[kind]


def _check_leaf(path, default, value):
    kind = default.kind if isinstance(default, Opt) else type(default)
    if value is None and isinstance(default, Opt):
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{path}: expected {_type_name(kind)}, got {value!r} ({type(value).__name__})")


def _merge(defaults, user, prefix):
    if not isinstance(user, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {user!r}")
    for key in user:
        if key not in defaults:
            path = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(defaults), n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{path}'{hint}")
    out = Config()
    for key, default in defaults.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(default, dict):
            if path in OPTIONAL_SECTIONS and user.get(key) is None:
                out[key] = None
            else:
                out[key] = _merge(default, user.get(key, {}), path)
        elif key in user:
            out[key] = _check_leaf(path, default, user[key])
        else:
            out[key] = None if isinstance(default, Opt) else default
    return out


def _apply_override(raw, item):
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: '{part}' is not a section")
    node[leaf] = yaml.safe_load(text)


def load_config(path, overrides=()):
    """The validated config from a YAML file plus `key.path=value` overrides."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    for item in overrides:
        _apply_override(raw, item)
    cfg = _merge(DEFAULTS, raw, "")
    validate_config(cfg)
    return cfg


def validate_config(cfg):
    """The seed's checks, with its messages, plus ours (t_list decreasing and ending at 0)."""
    student, teacher, m = cfg.models.student, cfg.models.teacher, cfg.method
    if student is None:
        raise ConfigError("KDMethod requires role 'student'")
    if not student.trainable:
        raise ConfigError("KDMethod requires student to be trainable")
    t_list = m.t_list
    if not isinstance(t_list, list) or not t_list or not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) for t in t_list
    ):
        raise ConfigError(
            "method_config.t_list must be a non-empty list of integer timestep values, e.g. [999, 937, 833, 624, 0]"
        )
    if m.student_sample_steps is None:
        m.student_sample_steps = len(t_list) - 1
    if len(t_list) != m.student_sample_steps + 1:
        raise ConfigError(
            f"len(t_list)={len(t_list)} must equal student_sample_steps+1={m.student_sample_steps + 1}"
        )
    if any(a <= b for a, b in zip(t_list, t_list[1:])) or t_list[-1] != 0 or len(t_list) < 2:
        raise ConfigError(f"method.t_list must be strictly decreasing and end at 0 (at least two entries), got {t_list}")
    if t_list[0] > 1000:
        raise ConfigError(f"method.t_list values must lie in [0, 1000], got {t_list}")
    if not m.teacher_path_cache:
        raise ConfigError("method_config.teacher_path_cache must be set")
    if teacher is not None and teacher.trainable:
        raise ConfigError("KDMethod requires teacher to be non-trainable (set trainable: false in models.teacher)")
    if m.num_frames_per_block < 1:
        raise ConfigError("num_frames_per_block must be >= 1")
    if m.teacher_inference_steps < 1:
        raise ConfigError("method.teacher_inference_steps must be >= 1")
    if m.t_list_tolerance < 0:
        raise ConfigError("method.t_list_tolerance must be >= 0")
    if cfg.pipeline.flow_shift <= 0:
        raise ConfigError("pipeline.flow_shift must be > 0")
    if cfg.data.cache_dtype not in CACHE_DTYPES:
        raise ConfigError(f"data.cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {cfg.data.cache_dtype!r}")
    if cfg.data.num_samples is not None and cfg.data.num_samples < 1:
        raise ConfigError("data.num_samples must be >= 1")
    for role in ("student", "teacher"):
        section = cfg.models[role]
        if section is not None and not section.init_from:
            raise ConfigError(f"models.{role}.init_from must be set (a hub id or a local diffusers directory)")


def config_from_argv(argv):
    if not argv or argv[0].startswith("-"):
        raise SystemExit(f"usage: {os.path.basename(sys.argv[0])} CONFIG.yaml [key.path=value ...]")
    return load_config(argv[0], argv[1:])


# ----------------------------------------------------------------------------------------------------------
# Flow matching. Wan predicts v = eps - x0 and x_t = (1 - sigma) * x0 + sigma * eps, with timestep = 1000 * sigma.

NUM_TRAIN_TIMESTEPS = 1000


def shifted_sigmas(num_steps, shift):
    """The teacher's sigma grid [num_steps], 1 first, 0 excluded, float64 (Wan / Self-Forcing's construction)."""
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def timestep_to_sigma(t):
    return t / NUM_TRAIN_TIMESTEPS


def add_noise(x0, noise, sigma):
    return (1 - sigma) * x0 + sigma * noise


def x0_from_velocity(x_t, v, sigma):
    return x_t - sigma * v


def euler_step(x_t, v, sigma, sigma_next):
    """One ODE step dx/dsigma = v from sigma to sigma_next (< sigma)."""
    return x_t + (sigma_next - sigma) * v


def match_t_list(t_list, num_steps, shift, tolerance):
    """Teacher-grid step index of each t_list entry but the final 0; an entry farther than `tolerance` is an error."""
    grid = shifted_sigmas(num_steps, shift) * NUM_TRAIN_TIMESTEPS
    indices = []
    for t in t_list[:-1]:
        dist_ = (grid - t).abs()
        i = int(dist_.argmin())
        if dist_[i] > tolerance:
            near = sorted(range(num_steps), key=lambda j: float(dist_[j]))[:3]
            values = ", ".join(f"{float(grid[j]):.2f} (step {j})" for j in sorted(near))
            raise ConfigError(
                f"method.t_list entry {t} is {float(dist_[i]):.2f} timesteps from the teacher's grid "
                f"({num_steps} steps, flow_shift {shift}); nearest grid values: {values}; "
                f"tolerance is method.t_list_tolerance={tolerance}"
            )
        indices.append(i)
    return indices


def recorded_steps(cfg):
    """Teacher step indices whose pre-step state the cache keeps (x0 is always kept after them)."""
    m = cfg.method
    matched = match_t_list(m.t_list, m.teacher_inference_steps, cfg.pipeline.flow_shift, m.t_list_tolerance)
    return list(range(m.teacher_inference_steps)) if m.keep_full_trajectory else matched


def recorded_timesteps(cfg):
    """The timesteps the cache records, one per kept state, 0 last, as float32 values."""
    grid = shifted_sigmas(cfg.method.teacher_inference_steps, cfg.pipeline.flow_shift) * NUM_TRAIN_TIMESTEPS
    values = grid[recorded_steps(cfg)].tolist() + [0.0]
    return torch.tensor(values, dtype=torch.float32).tolist()


# ----------------------------------------------------------------------------------------------------------
# Models. Parameters are fp32 (one dtype for FSDP2); GPU compute runs under bf16 autocast.

TINY_MODELS = {  # offline random Wan pipelines, created on first use at any path ending in these names
    "wan-tiny-teacher": dict(layers=4, heads=2, head_dim=16, ffn_dim=64, seed=1),
    "wan-tiny-student": dict(layers=2, heads=2, head_dim=12, ffn_dim=48, seed=2),
}
TINY_TEXT_DIM = 32  # d_model of the tiny UMT5 (must be shared by tiny teacher and student)
TINY_CORPUS = (  # the tiny byte-level BPE tokenizer is trained on these words; any text still tokenizes
    "a cat walks along the beach at sunset while waves roll in slowly. a drone flies over snowy mountains "
    "and a quiet river in the forest. a red car drives through a rainy city street at night with neon lights. "
    "two dogs play with a ball in a green park; children laugh. close-up of coffee poured into a white cup."
)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_CORPUS] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def make_tiny_wan(path, layers, heads, head_dim, ffn_dim, seed):
    """Write a complete random Wan diffusers directory (transformer, UMT5, tokenizer, VAE, scheduler) to `path`."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer), d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    )
    transformer = WanTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16,
        text_dim=TINY_TEXT_DIM, freq_dim=32, ffn_dim=ffn_dim, num_layers=layers, rope_max_seq_len=64,
    )
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(path)


def ensure_model_dir(init_from):
    """`init_from` itself; a missing path named after a TINY_MODELS entry is created first (atomically)."""
    spec = TINY_MODELS.get(os.path.basename(os.path.normpath(init_from)))
    if spec is None or os.path.exists(init_from):
        return init_from
    tmp = f"{os.path.normpath(init_from)}.tmp{os.getpid()}"
    make_tiny_wan(tmp, **spec)
    try:
        os.rename(tmp, init_from)
    except OSError:  # another process finished the same deterministic build first
        shutil.rmtree(tmp, ignore_errors=True)
    return init_from


def load_transformer(init_from, device, dtype=torch.float32):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(ensure_model_dir(init_from), subfolder="transformer",
                                                  torch_dtype=dtype)
    return model.to(device)


def load_text_encoder(init_from, device):
    """UMT5 encoder (bf16 on GPU, fp32 on CPU, eval mode) and its tokenizer."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    path = ensure_model_dir(init_from)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype).to(device).eval()
    return encoder, tokenizer


def latent_shape(init_from, cfg):
    """[C, F, H, W] of the teacher's latents for the configured video size, from configs only (no weights)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    path = ensure_model_dir(init_from)
    vae = AutoencoderKLWan.load_config(path, subfolder="vae")
    channels = WanTransformer3DModel.load_config(path, subfolder="transformer")["in_channels"]
    t_factor, s_factor = vae.get("scale_factor_temporal", 4), vae.get("scale_factor_spatial", 8)
    p = cfg.pipeline
    if (p.num_frames - 1) % t_factor or p.height % (2 * s_factor) or p.width % (2 * s_factor):
        raise ConfigError(
            f"pipeline.num_frames - 1 must be a multiple of {t_factor} and pipeline.height/width multiples of "
            f"{2 * s_factor}, got {p.num_frames}x{p.height}x{p.width}"
        )
    return [channels, (p.num_frames - 1) // t_factor + 1, p.height // s_factor, p.width // s_factor]


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------------
# The trajectory cache:
#   <cache>/samples/{index:08d}.safetensors  latents [K+1, C, F, H, W] (states at the recorded timesteps, then x0),
#                                            timesteps [K+1] float32 (0 last), prompt_embeds [L, D] (real tokens)
#   <cache>/metadata.json                    the fingerprint below
#   <cache>/COMPLETE                         written once every sample exists

CACHE_FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"


def sample_path(cache_dir, index):
    return os.path.join(cache_dir, "samples", f"{index:08d}.safetensors")


def read_prompts(cfg):
    path = cfg.data.prompts
    if not path:
        raise ConfigError("data.prompts must be set (a text file with one prompt per line)")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise ConfigError(f"data.prompts: file {path} does not exist") from None
    n = cfg.data.num_samples
    if n is not None and n > len(prompts):
        raise ConfigError(f"data.num_samples={n} but {path} holds only {len(prompts)} prompts")
    return prompts[:n] if n is not None else prompts


def prompts_sha256(prompts):
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def cache_fingerprint(cfg, prompts, shape):
    """What a cache was made from; a cache whose fingerprint differs from the config's is refused."""
    m, p = cfg.method, cfg.pipeline
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "teacher": cfg.models.teacher.init_from if cfg.models.teacher else None,
        "teacher_inference_steps": m.teacher_inference_steps,
        "teacher_guidance_scale": m.teacher_guidance_scale,
        "teacher_negative_prompt": m.teacher_negative_prompt,
        "flow_shift": p.flow_shift,
        "num_frames": p.num_frames,
        "height": p.height,
        "width": p.width,
        "max_sequence_length": p.max_sequence_length,
        "latent_shape": list(shape) if shape is not None else None,
        "timesteps": recorded_timesteps(cfg),
        "num_samples": len(prompts),
        "prompts_sha256": prompts_sha256(prompts),
        "seed": cfg.data.seed,
        "dtype": cfg.data.cache_dtype,
    }


def fingerprint_differences(expected, found, skip=()):
    """'field: config X, cache Y' for every differing field (None in `expected` means unknown, not compared)."""
    lines = []
    for key in sorted(set(expected) | set(found)):
        if key in skip or expected.get(key) is None:
            continue
        if expected.get(key) != found.get(key):
            lines.append(f"  {key}: config {expected.get(key)!r}, cache {found.get(key)!r}")
    return lines


def check_cache_metadata(cache_dir, expected):
    """Refuse a cache made from a different config; returns the stored metadata or None if there is none yet."""
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


def write_atomic(path, write):
    """Run write(tmp_path), fsync it, then rename over `path`: a crash leaves either the old file or the new one."""
    tmp = path + TMP_SUFFIX
    write(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # some writers create 0600 files; caches are often shared
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")

    write_atomic(path, write)


def sample_file_problem(path, fingerprint, index):
    """Why the cached sample at `path` is unusable, or None if its header and shapes match the fingerprint."""
    from safetensors import safe_open

    k1 = len(fingerprint["timesteps"])
    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            if keys != {"latents", "timesteps", "prompt_embeds"}:
                return f"tensors {sorted(keys)}"
            meta = f.metadata() or {}
            if meta.get("index") != str(index):
                return f"metadata index {meta.get('index')!r}, expected {index}"
            latents = f.get_slice("latents")
            want = [k1] + list(fingerprint["latent_shape"])
            if list(latents.get_shape()) != want:
                return f"latents shape {latents.get_shape()}, expected {want}"
            if latents.get_dtype() != {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[fingerprint["dtype"]]:
                return f"latents dtype {latents.get_dtype()}"
            if f.get_tensor("timesteps").tolist() != fingerprint["timesteps"]:
                return "recorded timesteps differ"
            emb = f.get_slice("prompt_embeds").get_shape()
            if len(emb) != 2 or not 0 < emb[0] <= fingerprint["max_sequence_length"]:
                return f"prompt_embeds shape {emb}"
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        return f"unreadable ({type(e).__name__}: {e})"
    return None


# ----------------------------------------------------------------------------------------------------------
# Distributed: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; without them we are one process.

DIST_TIMEOUT = timedelta(hours=2)  # ranks that finish early wait this long at barriers (one teacher sample < 10 min)


def init_distributed():
    """(rank, world_size, device): NCCL and cuda:LOCAL_RANK on GPU, gloo on CPU, or a single process."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda", 0) if cuda else torch.device("cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=DIST_TIMEOUT,
                                device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def free_device_memory(device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def shutdown_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def run_cli(main, argv):
    """main(argv), turning a bad config or cache into one line on stderr (rank 0) and exit status 2."""
    try:
        main(argv)
    except (ConfigError, CacheError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        shutdown_distributed()
        sys.exit(2)
