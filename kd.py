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
import math
import os
import re
import shutil
import signal
import sys
import time
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm


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
            "attention": "full",  # full | block_causal: frame block b attends only to blocks <= b (self-attention)
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
    "training": {
        "output_dir": "runs/kd",  # checkpoint-{step}/ folders, metrics.jsonl, eval.jsonl, config.yaml
        "max_steps": 2000,  # optimizer steps
        "batch_size": 1,  # samples per rank per micro-step
        "grad_accum_steps": 1,  # micro-steps per optimizer step
        "lr": 2e-6,  # AdamW peak learning rate
        "betas": [0.9, 0.999],  # AdamW betas
        "weight_decay": 0.01,  # AdamW decoupled weight decay
        "eps": 1e-8,  # AdamW epsilon
        "warmup_steps": 0,  # linear warmup from 0 to lr, in optimizer steps
        "lr_schedule": "constant",  # after warmup: constant | cosine (to 0 at max_steps)
        "max_grad_norm": 1.0,  # clip the global gradient norm to this (0 = no clipping)
        "gradient_checkpointing": False,  # recompute each transformer block in backward (less memory)
        "seed": 0,  # data order and timestep draws
        "num_workers": 2,  # DataLoader worker processes per rank (0 = load in the training process)
        "prefetch_factor": 4,  # batches each worker loads ahead
        "log_every": 10,  # optimizer steps between metrics.jsonl lines
        "checkpoint_every": 500,  # optimizer steps between checkpoints (a final one is always written)
        "keep_checkpoints": 3,  # keep the latest K complete checkpoints
        "resume": "auto",  # auto: from the highest complete checkpoint in output_dir | never | a checkpoint path
        "eval_every": 500,  # optimizer steps between evaluations on the held-out samples (and at the end)
        "eval_samples": 4,  # the last N cache samples are held out from training for evaluation
        "previews": True,  # at each eval, decode held-out samples with the student dir's VAE to output_dir/previews/
        "preview_samples": 2,  # held-out samples decoded per eval (the first of the eval samples; at most eval_samples)
        "wandb_project": Opt(str),  # log to this Weights & Biases project (wandb is imported only then)
    },
}

OPTIONAL_SECTIONS = ("models.student", "models.teacher")  # absent from the YAML means the role is absent
CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ConfigError(ValueError):
    """A config field is missing, unknown, of the wrong type or out of range."""


class CacheError(ValueError):
    """The trajectory cache is missing, stale or unreadable."""


class WriteError(RuntimeError):
    """A file could not be written: disk full, file-size limit, permissions."""


class Config(dict):
    """A dict whose keys also read as attributes: cfg.method.t_list."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(kind):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}[kind]


def _check_leaf(path, default, value):
    kind = default.kind if isinstance(default, Opt) else type(default)
    if value is None and isinstance(default, Opt):
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif kind is float and isinstance(value, str) and FLOAT_RE.fullmatch(value.strip()):
        value = float(value)  # PyYAML reads 1e-4 (no dot) as a string
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: expected a finite number, got {value!r}")
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
    try:
        node[leaf] = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None


def load_config(path, overrides=()):
    """The validated config from a YAML file plus `key.path=value` overrides."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is unreadable: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
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
        isinstance(t, (int, float)) and not isinstance(t, bool) and not (isinstance(t, float) and math.isnan(t))
        for t in t_list
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
    if not m.teacher_path_cache or not m.teacher_path_cache.strip():
        raise ConfigError("method_config.teacher_path_cache must be set")
    if teacher is not None and teacher.trainable:
        raise ConfigError("KDMethod requires teacher to be non-trainable (set trainable: false in models.teacher)")
    if m.num_frames_per_block < 1:
        raise ConfigError("num_frames_per_block must be >= 1")
    if not 1 <= m.teacher_inference_steps <= NUM_TRAIN_TIMESTEPS:
        raise ConfigError(f"method.teacher_inference_steps must be in [1, {NUM_TRAIN_TIMESTEPS}], "
                          f"got {m.teacher_inference_steps}")
    if m.teacher_guidance_scale < 0:
        raise ConfigError(f"method.teacher_guidance_scale must be >= 0, got {m.teacher_guidance_scale}")
    if m.t_list_tolerance < 0:
        raise ConfigError("method.t_list_tolerance must be >= 0")
    p = cfg.pipeline
    if p.flow_shift <= 0:
        raise ConfigError("pipeline.flow_shift must be > 0")
    for key in ("num_frames", "height", "width", "max_sequence_length"):
        if p[key] < 1:
            raise ConfigError(f"pipeline.{key} must be >= 1, got {p[key]}")
    match_t_list(t_list, m.teacher_inference_steps, p.flow_shift, m.t_list_tolerance)  # off-grid entries fail now
    if not 0 <= cfg.data.seed < 2**62:  # seed + i seeds a torch.Generator (64-bit)
        raise ConfigError(f"data.seed must be in [0, 2**62), got {cfg.data.seed}")
    if cfg.data.cache_dtype not in CACHE_DTYPES:
        raise ConfigError(f"data.cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {cfg.data.cache_dtype!r}")
    if cfg.data.num_samples is not None and cfg.data.num_samples < 1:
        raise ConfigError("data.num_samples must be >= 1")
    if student.attention not in ("full", "block_causal"):
        raise ConfigError(f"models.student.attention must be 'full' or 'block_causal', got {student.attention!r}")
    t = cfg.training
    positive = ("max_steps", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                "eval_every", "prefetch_factor")
    for key in positive:
        if t[key] < 1:
            raise ConfigError(f"training.{key} must be >= 1, got {t[key]}")
    for key in ("lr", "weight_decay", "eps", "warmup_steps", "max_grad_norm", "num_workers", "eval_samples",
                "preview_samples"):
        if t[key] < 0:
            raise ConfigError(f"training.{key} must be >= 0, got {t[key]}")
    if len(t.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                    for b in t.betas):
        raise ConfigError(f"training.betas must be two numbers in [0, 1), got {t.betas}")
    if t.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"training.lr_schedule must be 'constant' or 'cosine', got {t.lr_schedule!r}")
    for role in ("student", "teacher"):
        section = cfg.models[role]
        if section is not None and not (section.init_from or "").strip():
            raise ConfigError(f"models.{role}.init_from must be set (a hub id or a local diffusers directory)")


HUB_ID_RE = re.compile(r"[\w.-]+/[\w.-]+")  # what from_pretrained looks up on the hub when no such path exists


def check_paths(cfg):
    """The files and folders a run starts from, checked before anything loads: a ConfigError naming the field.

    Hub ids ('namespace/name' with no such local path) and missing tiny-model paths (built on first use) pass.
    """
    needs = {"student": ["transformer/config.json"],
             "teacher": ["transformer/config.json", "text_encoder/config.json", "tokenizer", "vae/config.json"]}
    for role, parts in needs.items():
        section = cfg.models[role]
        path = section.init_from if section is not None else None
        if path is None or (not os.path.exists(path) and (HUB_ID_RE.fullmatch(path) or
                                                           os.path.basename(os.path.normpath(path)) in (*TINY_MODELS, *TINY_DEMO_MODELS))):
            continue
        if not os.path.isdir(path):
            raise ConfigError(f"models.{role}.init_from: {path} is not a directory (expected a diffusers Wan "
                              "directory or a hub id 'namespace/name')")
        absent = [part for part in parts if not os.path.exists(os.path.join(path, part))]
        if absent:
            raise ConfigError(f"models.{role}.init_from: {path} has no {', '.join(absent)} (expected a diffusers Wan "
                              "directory)")
    if cfg.data.prompts:
        read_prompts(cfg)
    teacher = cfg.models.teacher
    if teacher is not None and os.path.isdir(teacher.init_from):  # the video size against the VAE's factors
        latent_shape(teacher.init_from, cfg)
    for field, path in (("method.teacher_path_cache", cfg.method.teacher_path_cache),
                        ("training.output_dir", cfg.training.output_dir)):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"{field}: {path} exists and is not a directory")
    resume = cfg.training.resume
    if resume not in ("auto", "never") and not os.path.exists(os.path.join(resume, "trainer_state.pt")):
        raise ConfigError(f"training.resume: {resume} is not a complete checkpoint folder (expected auto, never or "
                          "a checkpoint-N folder holding trainer_state.pt)")


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
    "wan-bench-small": dict(layers=2, heads=4, head_dim=64, ffn_dim=1024, seed=3),  # bench.py: compute dominates
}
RANDOM_TINY_SETTINGS = [  # overrides for the random models (configs/tiny.yaml is tuned for the demo models)
    "pipeline.max_sequence_length=512", "training.lr=1e-3", "method.t_list=[999, 937, 833, 624, 0]",
]
TINY_DEMO_MODELS = ("wan-tiny-demo-teacher", "wan-tiny-demo-student")  # pre-trained on moving shapes (tiny_demo.py)
TINY_TEXT_DIM = 32  # d_model of the tiny UMT5 (must be shared by tiny teacher and student)
TINY_CORPUS = (  # the tiny byte-level BPE tokenizer is trained on these words; any text still tokenizes
    "a cat walks along the beach at sunset while waves roll in slowly. a drone flies over snowy mountains "
    "and a quiet river in the forest. a red car drives through a rainy city street at night with neon lights. "
    "two dogs play with a ball in a green park; children laugh. close-up of coffee poured into a white cup."
)


def _tiny_tokenizer(corpus=TINY_CORPUS):
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
    tok.train_from_iterator([corpus] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def _tiny_text_encoder(vocab_size):
    """A random 2-layer UMT5 encoder of width TINY_TEXT_DIM (drawn from the global RNG)."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=vocab_size, d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    )


def make_tiny_wan(path, layers, heads, head_dim, ffn_dim, seed):
    """Write a complete random Wan diffusers directory (transformer, UMT5, tokenizer, VAE, scheduler) to `path`."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    text_encoder = _tiny_text_encoder(len(tokenizer))
    transformer = WanTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16,
        text_dim=TINY_TEXT_DIM, freq_dim=32, ffn_dim=ffn_dim, num_layers=layers, rope_max_seq_len=64,
    )
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(path)


def build_tiny(paths):
    """Write each tiny model {name: path}: TINY_MODELS entries, or demo models (one build, shared components)."""
    demo = {name: path for name, path in paths.items() if name in TINY_DEMO_MODELS}
    if demo:
        import tiny_demo

        tiny_demo.build(demo)
    for name, path in paths.items():
        if name in TINY_MODELS:
            make_tiny_wan(path, **TINY_MODELS[name])


def ensure_model_dir(init_from):
    """`init_from` itself; a missing path named after a tiny model is created first (atomically, by one process).

    The demo models are built together (they share text encoder, VAE and the encoded data set) next to each other.
    """
    import fcntl

    name = os.path.basename(os.path.normpath(init_from))
    if (name not in TINY_MODELS and name not in TINY_DEMO_MODELS) or os.path.exists(init_from):
        return init_from
    folder = os.path.dirname(os.path.normpath(init_from)) or "."
    group = TINY_DEMO_MODELS if name in TINY_DEMO_MODELS else (name,)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{group[0]}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks and concurrent runs wait for one builder (the demo takes minutes)
        missing = [n for n in group if not os.path.exists(os.path.join(folder, n))]
        if name in missing:
            tmp = {n: os.path.join(folder, f"{n}.tmp{os.getpid()}") for n in missing}
            for path in tmp.values():
                shutil.rmtree(path, ignore_errors=True)
            if dist.is_initialized():  # transformers' save_pretrained writes nothing on ranks != 0: build outside
                import subprocess

                code = f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); " \
                       f"import kd; kd.build_tiny({tmp!r})"
                subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
            else:
                build_tiny(tmp)
            for n, path in tmp.items():
                os.rename(path, os.path.join(folder, n))
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
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=compute_dtype(device))
    encoder = encoder.to(device).eval()
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


def compute_dtype(device):
    """bf16 on GPU, fp32 on CPU (where bf16 matmuls are slow and tests want exact arithmetic)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------------
# The trajectory cache:
#   <cache>/samples/{index:08d}.safetensors  latents [K+1, C, F, H, W] (states at the recorded timesteps, then x0),
#                                            timesteps [K+1] float32 (0 last), prompt_embeds [L, D] (real tokens)
#   <cache>/negative_prompt_embeds.safetensors  prompt_embeds [L, D] of the CFG negative prompt
#   <cache>/metadata.json                    the fingerprint below
#   <cache>/COMPLETE                         written once every sample exists
# Each sample file's metadata holds CRC32 checksums of every (state, latent frame) slice of `latents`, of
# `timesteps`, of `prompt_embeds` and of the other metadata, so that the dataset can verify exactly the slices it
# reads and a resumed generation the whole file.

CACHE_FORMAT_VERSION = 2  # 2: per-slice CRC32 checksums in each sample file's metadata
TMP_SUFFIX = ".tmp"


def pad_embeds(embeds, length):
    """[L, D] -> [length, D], zero rows after the real tokens (what the teacher saw)."""
    return torch.cat([embeds, embeds.new_zeros(length - embeds.shape[0], embeds.shape[1])])


def sample_path(cache_dir, index):
    return os.path.join(cache_dir, "samples", f"{index:08d}.safetensors")


def negative_embeds_path(cache_dir):
    return os.path.join(cache_dir, "negative_prompt_embeds.safetensors")


def read_prompts(cfg):
    path = cfg.data.prompts
    if not path:
        raise ConfigError("data.prompts must be set (a text file with one prompt per line)")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise ConfigError(f"data.prompts: file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.prompts: cannot read {path} as UTF-8 text ({e})") from None
    if not prompts:
        raise ConfigError(f"data.prompts: {path} holds no prompts")
    n = cfg.data.num_samples
    if n is not None and n > len(prompts):
        raise ConfigError(f"data.num_samples={n} but {path} holds only {len(prompts)} prompts")
    return prompts[:n] if n is not None else prompts


def prompts_sha256(prompts):
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def cache_fingerprint(cfg, prompts=None, shape=None):
    """What a cache was made from; a cache whose fingerprint differs from the config's is refused.

    Fields that cannot be known (no prompts file, no teacher to read the latent shape from) are None: not compared.
    """
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
        "num_samples": len(prompts) if prompts is not None else cfg.data.num_samples,
        "prompts_sha256": prompts_sha256(prompts) if prompts is not None else None,
        "seed": cfg.data.seed,
        "dtype": cfg.data.cache_dtype,
    }


def fingerprint_differences(expected, found):
    """'field: config X, cache Y' for every differing field (None in `expected` means unknown, not compared)."""
    lines = []
    for key in sorted(set(expected) | set(found)):
        if expected.get(key) is None:
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


def crc32(tensor):
    """CRC32 of a tensor's bytes in row-major order."""
    return zlib.crc32(tensor.contiguous().view(torch.uint8).numpy())


def frame_checksums(latents):
    """CRC32 of each (state, latent frame) slice of latents [K+1, C, F, H, W]: K+1 lists of F ints."""
    return [[crc32(latents[k, :, f]) for f in range(latents.shape[2])] for k in range(latents.shape[0])]


def metadata_checksum(metadata):
    """CRC32 of a cache file's metadata strings, its own entry excluded."""
    rest = {k: v for k, v in metadata.items() if k != "crc32_metadata"}
    return str(zlib.crc32(json.dumps(rest, sort_keys=True).encode("utf-8")))


def checksum_metadata(tensors, info):
    """Safetensors metadata for a cache file: `info` plus a CRC32 per tensor (per (state, frame) slice for
    `latents`) and one over the metadata itself, all strings."""
    metadata = {k: str(v) for k, v in info.items()}
    for name, tensor in tensors.items():
        metadata[f"crc32_{name}"] = json.dumps(frame_checksums(tensor)) if name == "latents" else str(crc32(tensor))
    metadata["crc32_metadata"] = metadata_checksum(metadata)
    return metadata


REGENERATE_HINT = "rerun generate_cache.py with the same config to regenerate it"


def checked_metadata(metadata, path):
    """A cache file's metadata after its own checksum (CacheError if it has none or it fails)."""
    if "crc32_metadata" not in metadata:
        raise CacheError(f"cache file {path} has no checksums (written by an older version, or damaged); "
                         f"{REGENERATE_HINT}")
    if metadata_checksum(metadata) != metadata["crc32_metadata"]:
        raise CacheError(f"cache file {path} is corrupt: its metadata fails its CRC32 checksum; {REGENERATE_HINT}")
    return metadata


def verify(tensor, expected, path, what):
    """`tensor`, after checking its bytes against the stored CRC32 `expected` (CacheError naming the file)."""
    if crc32(tensor) != int(expected):
        raise CacheError(f"cache file {path} is corrupt: {what} fails its CRC32 checksum; {REGENERATE_HINT}")
    return tensor


def read_negative_embeds(cache_dir):
    """prompt_embeds [L, D] of the CFG negative prompt, verified against its checksum (CacheError naming the file)."""
    from safetensors import safe_open

    path = negative_embeds_path(cache_dir)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = checked_metadata(f.metadata() or {}, path)
            return verify(f.get_tensor("prompt_embeds"), metadata["crc32_prompt_embeds"], path, "prompt_embeds")
    except CacheError:
        raise
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        raise CacheError(f"cannot read cache file {path}: {type(e).__name__}: {one_line(e)}; {REGENERATE_HINT}") \
            from None


def negative_embeds_problem(cache_dir):
    """Why the negative prompt's embeddings file is unusable, or None."""
    try:
        read_negative_embeds(cache_dir)
    except CacheError as e:
        return str(e)
    return None


def write_atomic(path, write):
    """Run write(tmp_path), fsync it, then rename over `path`: a crash leaves either the old file or the new one.

    A failed write (disk full, file-size limit) removes the temporary file and raises WriteError naming `path`.
    """
    from safetensors import SafetensorError

    tmp = path + TMP_SUFFIX
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # some writers create 0600 files; caches are often shared
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a failed write as RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        raise WriteError(f"writing {path}: {one_line(e)}") from None
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def one_line(error):
    return " ".join(str(error).split())


def make_dirs(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WriteError(f"creating {path}: {one_line(e)}") from None


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_lines(path, lines):
    with open(path, "w") as f:
        f.writelines(lines)


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
            if frame_checksums(f.get_tensor("latents")) != json.loads(checked_metadata(meta, path)["crc32_latents"]):
                return "latents fail their CRC32 checksums"
            if crc32(f.get_tensor("timesteps")) != int(meta["crc32_timesteps"]):
                return "timesteps fail their CRC32 checksum"
            if crc32(f.get_tensor("prompt_embeds")) != int(meta["crc32_prompt_embeds"]):
                return "prompt_embeds fail their CRC32 checksum"
    except CacheError as e:
        return str(e)
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        return f"unreadable ({type(e).__name__}: {one_line(e)})"
    return None


# ----------------------------------------------------------------------------------------------------------
# Distributed: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; without them we are one process.

DIST_TIMEOUT = timedelta(hours=2)  # ranks that finish early wait this long at barriers (one teacher sample < 10 min)


def init_distributed():
    """(rank, world_size, device): NCCL and cuda:LOCAL_RANK on GPU, gloo on CPU.

    Without torchrun the process is a world of one, so FSDP2 and DCP run exactly the same code.
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend, device_id = ("nccl", device) if cuda else ("gloo", None)
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=DIST_TIMEOUT, device_id=device_id)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=DIST_TIMEOUT,
                                    device_id=device_id)
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
    """main(argv), turning a bad config, cache or write into one line on stderr and exit status 2.

    A config error is the same on every rank and printed by rank 0; the others (a file one rank reads or writes, a
    non-finite value) are printed by each rank that meets them.
    """
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past a file-size limit the write fails (EFBIG), not the process
    try:
        main(argv)
    except (ConfigError, CacheError, FloatingPointError, WriteError) as e:
        rank = int(os.environ.get("RANK", "0"))
        for bar in list(getattr(tqdm, "_instances", ())):  # an open bar would redraw after the message at exit
            bar.close()
        if rank == 0 or not isinstance(e, ConfigError):
            print(f"error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        shutdown_distributed()
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------
# The cached-trajectory dataset


def open_cache(cfg):
    """The metadata of cfg's complete, matching cache (CacheError if it is incomplete or was made differently)."""
    cache_dir = cfg.method.teacher_path_cache
    if not os.path.exists(os.path.join(cache_dir, "COMPLETE")):
        raise CacheError(
            f"Teacher path cache at {cache_dir} is incomplete and no teacher model is configured; "
            "add a 'teacher' entry under 'models:' or provide a complete cache"
        )
    prompts = read_prompts(cfg) if cfg.data.prompts else None
    shape = latent_shape(cfg.models.teacher.init_from, cfg) if cfg.models.teacher else None
    meta = check_cache_metadata(cache_dir, cache_fingerprint(cfg, prompts, shape))
    if meta is None:
        raise CacheError(f"{cache_dir} has COMPLETE but no metadata.json; delete it to regenerate the cache")
    absent = [sample_path(cache_dir, i) for i in range(meta["num_samples"])
              if not os.path.exists(sample_path(cache_dir, i))]
    if absent:
        raise CacheError(f"{len(absent)} cached sample file(s) are missing ({', '.join(absent[:3])}"
                         f"{', ...' if len(absent) > 3 else ''}); rerun generate_cache.py with the same config to "
                         "regenerate them")
    return meta


def state_positions(cfg, recorded):
    """Position in a cached file's state axis of each t_list entry but the final 0 (matched to `recorded`)."""
    grid = torch.tensor(recorded[:-1], dtype=torch.float64)
    positions = []
    for t in cfg.method.t_list[:-1]:
        i = int((grid - t).abs().argmin())
        if abs(float(grid[i]) - t) > cfg.method.t_list_tolerance:
            raise CacheError(f"t_list entry {t} has no cached state within method.t_list_tolerance; the cache "
                             f"recorded timesteps {recorded}")
        positions.append(i)
    return positions


class TrajectoryDataset(torch.utils.data.Dataset):
    """Reads, per item (sample index, per-frame step indices [F]), only the states that item needs.

    Returns x_t [C, F, H, W] (each frame from the state of its own step), x0 [C, F, H, W] and the prompt
    embeddings zero-padded to the length the teacher saw [max_len, D], all in the cache dtype.
    """

    def __init__(self, cache_dir, positions, max_len):
        self.cache_dir, self.positions, self.max_len = cache_dir, positions, max_len

    def __getitem__(self, key):
        index, steps = key
        path = sample_path(self.cache_dir, index)
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                metadata = checked_metadata(f.metadata() or {}, path)
                crcs = json.loads(metadata["crc32_latents"])  # [K+1][F]
                latents = f.get_slice("latents")  # [K+1, C, F, H, W] on disk
                runs, start = [], 0
                for end in range(1, len(steps) + 1):  # consecutive frames drawing the same state: one slice
                    if end == len(steps) or steps[end] != steps[start]:
                        runs.append(latents[self.positions[steps[start]], :, start:end])
                        start = end
                x_t = torch.cat(runs, dim=1)  # [C, F, H, W]
                x0 = latents[-1]  # [C, F, H, W]
                embeds = verify(f.get_tensor("prompt_embeds"), metadata["crc32_prompt_embeds"], path, "prompt_embeds")
                verify(f.get_tensor("timesteps"), metadata["crc32_timesteps"], path, "timesteps")  # 4(K+1) bytes
            for frame, step in enumerate(steps):
                state = self.positions[step]
                verify(x_t[:, frame], crcs[state][frame], path, f"latents[{state}, :, {frame}]")
                verify(x0[:, frame], crcs[-1][frame], path, f"latents[-1, :, {frame}]")
        except CacheError:
            raise
        except Exception as e:
            raise CacheError(f"cannot read cached sample {path}: {type(e).__name__}: {one_line(e)}; "
                             f"{REGENERATE_HINT}") from None
        return {"x_t": x_t, "x0": x0, "prompt_embeds": pad_embeds(embeds, self.max_len), "steps": torch.tensor(steps),
                "index": index}

    def __getitems__(self, keys):
        """A DataLoader batch; a CacheError comes back as data, [{"error": message}], so that the training process
        can report it in one line (the DataLoader re-raises a worker's exceptions with its traceback as message)."""
        try:
            return [self[key] for key in keys]
        except CacheError as e:
            return [{"error": str(e)}]


def collate(items):
    """default_collate, passing through the error item of TrajectoryDataset.__getitems__."""
    return items[0] if "error" in items[0] else torch.utils.data.default_collate(items)


def stable_seed(*parts):
    """A 63-bit seed from any parts, the same in every process and run."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class KDBatchSampler:
    """Endless (sample index, step indices) batches for one rank, from micro-batch `start` on.

    Epoch e shuffles the training indices from (seed, e); rank r takes a fixed stride of the shuffle (all ranks
    equally many); micro-batch p draws its timesteps from (seed, rank, p). Batch p is therefore the same
    whether the run started at 0 or resumed at p.
    """

    def __init__(self, train_indices, batch_size, rank, world_size, seed, num_frames, sample_steps, start=0):
        self.train, self.batch_size, self.rank, self.world = train_indices, batch_size, rank, world_size
        self.seed, self.num_frames, self.sample_steps, self.start = seed, num_frames, sample_steps, start
        self.per_epoch = len(train_indices) // world_size // batch_size
        if self.per_epoch < 1:
            raise ConfigError(
                f"{len(train_indices)} training samples cannot fill one batch of training.batch_size={batch_size} "
                f"on each of {world_size} ranks; generate more samples or lower training.eval_samples"
            )

    def batch(self, position):
        epoch, j = divmod(position, self.per_epoch)
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(stable_seed(self.seed, epoch)))
        mine = order[: self.per_epoch * self.batch_size * self.world][self.rank :: self.world]
        chosen = mine[j * self.batch_size : (j + 1) * self.batch_size].tolist()
        g = torch.Generator().manual_seed(stable_seed(self.seed, self.rank, position))
        steps = self.sample_steps(g, len(chosen), self.num_frames)  # [B, F]
        return [(self.train[i], tuple(row)) for i, row in zip(chosen, steps.tolist())]

    def __iter__(self):
        position = self.start
        while True:
            yield self.batch(position)
            position += 1


# ----------------------------------------------------------------------------------------------------------
# The student


def rotate(x, cos, sin):
    """Wan's rotary embedding on x [B, L, heads, head_dim]; cos/sin [1, L, 1, head_dim] repeat each pair's angle."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 0::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).type_as(x)


class BlockCausalAttention:
    """Wan self-attention processor in which the tokens of frame block b attend only to the tokens of blocks <= b.

    One unmasked SDPA call per query block over the prefix of keys it may see: exact, no [L, L] mask, and on GPU
    the flash/efficient kernels still run (a dense boolean mask would cost L^2 bytes, about 1 GB at 480p x 21
    latent frames, and rule out flash). `tokens_per_block` is set before each forward by the model's pre-hook.
    """

    tokens_per_block = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # [B, L, heads, head_dim]
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = rotate(q, *rotary_emb), rotate(k, *rotary_emb)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, heads, L, head_dim]
        n = self.tokens_per_block
        out = torch.cat([torch.nn.functional.scaled_dot_product_attention(q[:, :, i : i + n], k[:, :, : i + n],
                                                                          v[:, :, : i + n])
                         for i in range(0, q.shape[2], n)], dim=2)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)  # [B, L, heads * head_dim]
        return attn.to_out[1](attn.to_out[0](out))


def make_block_causal(model, frames_per_block):
    """Give every self-attention layer of a WanTransformer3DModel the block-causal processor (weights untouched)."""
    if model.config.patch_size[0] != 1:
        raise ConfigError("block-causal attention needs a temporal patch size of 1 (every Wan2.1 model has it)")
    processor = BlockCausalAttention()
    for block in model.blocks:
        block.attn1.set_processor(processor)

    def set_block_size(module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, C, F, H, W]
        _, p_h, p_w = module.config.patch_size
        processor.tokens_per_block = frames_per_block * (x.shape[3] // p_h) * (x.shape[4] // p_w)

    model.register_forward_pre_hook(set_block_size, with_kwargs=True)


def _frame_block_forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb):
    """A Wan block whose modulation temb is per frame [B, F, 6, D], broadcast over each frame's tokens.

    Diffusers' per-token path would materialise [B, L, 6, D] fp32 per block; here it stays [B, F, 6, D].
    """
    if temb.dim() != 4 or temb.shape[1] == hidden_states.shape[1]:
        return type(block).forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb)
    frames = temb.shape[1]
    shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table[:, None] + temb.float()).unbind(2)

    def per_frame(x):  # [B, L, D] -> [B, F, tokens per frame, D]
        return x.unflatten(1, (frames, -1))

    def modulate(norm, x, shift_, scale_):
        return (per_frame(norm(x.float())) * (1 + scale_[:, :, None]) + shift_[:, :, None]).flatten(1, 2).type_as(x)

    attn = block.attn1(modulate(block.norm1, hidden_states, shift, scale), None, None, rotary_emb)
    h = (per_frame(hidden_states.float()) + per_frame(attn) * gate[:, :, None]).flatten(1, 2).type_as(hidden_states)
    h = h + block.attn2(block.norm2(h.float()).type_as(h), encoder_hidden_states, None, None)
    ff = block.ffn(modulate(block.norm3, h, c_shift, c_scale))
    return (per_frame(h.float()) + per_frame(ff.float()) * c_gate[:, :, None]).flatten(1, 2).type_as(h)


def _frame_model_forward(model, hidden_states, timestep, encoder_hidden_states, return_dict=True, **kwargs):
    """WanTransformer3DModel.forward, also accepting one timestep per latent frame: timestep [B, F]."""
    if timestep.dim() != 2 or timestep.shape[1] != hidden_states.shape[2]:
        return type(model).forward(model, hidden_states, timestep, encoder_hidden_states, return_dict=return_dict,
                                   **kwargs)
    batch, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = model.config.patch_size
    rotary = model.rope(hidden_states)
    h = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # [B, L, D]
    temb, proj, context, _ = model.condition_embedder(timestep.flatten(), encoder_hidden_states, None,
                                                      timestep_seq_len=frames)  # temb [B, F, D], proj [B, F, 6D]
    proj = proj.unflatten(2, (6, -1))  # [B, F, 6, D]
    for block in model.blocks:
        if torch.is_grad_enabled() and model.gradient_checkpointing:
            h = model._gradient_checkpointing_func(block, h, context, proj, rotary)
        else:
            h = block(h, context, proj, rotary)
    shift, scale = (model.scale_shift_table[:, None] + temb[:, :, None]).unbind(2)  # [B, F, D] each
    h = (model.norm_out(h.float()).unflatten(1, (frames, -1)) * (1 + scale[:, :, None]) + shift[:, :, None])
    h = model.proj_out(h.flatten(1, 2).type_as(hidden_states))  # [B, L, C * p_t * p_h * p_w]
    h = h.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
    out = h.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)  # [B, C, F, H, W]
    if not return_dict:
        return (out,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=out)  # what the stock forward returns


def accept_frame_timesteps(model):
    """Let a WanTransformer3DModel take timestep [B, F] (one per latent frame) at the memory cost of timestep [B]."""
    import types

    model.forward = types.MethodType(_frame_model_forward, model)
    for block in model.blocks:
        block.forward = types.MethodType(_frame_block_forward, block)


def build_student(cfg, device):
    """The student transformer, fp32 parameters, FSDP2-sharded per block then at the root (bf16 compute on GPU).

    Inputs are cast by student_velocity, not by FSDP: its input cast would round the timesteps to bf16 too
    (999 -> 1000), and the student must be conditioned on the t_list values as written.
    """
    model = load_transformer(cfg.models.student.init_from, torch.device("cpu"))
    return shard_student(model, cfg.models.student.attention, cfg.method.num_frames_per_block,
                         cfg.training.gradient_checkpointing, device)


def shard_student(model, attention, frames_per_block, gradient_checkpointing, device):
    """`model` with per-frame timesteps, its attention and checkpointing set, FSDP2-sharded (bench_gpu uses it)."""
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Wan returns a reshaped view; we only read it out of place, which FSDP2's warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    accept_frame_timesteps(model)
    if attention == "block_causal":
        make_block_causal(model, frames_per_block)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if device.type == "cuda" else None,
                              reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model.to(device)


def student_velocity(model, x_t, t_frames, uniform, prompt_embeds):
    """v [B, C, F, H, W] fp32 for inputs x_t [B, C, F, H, W] at per-frame timesteps t_frames [B, F] (fp32)."""
    dtype = compute_dtype(x_t.device)
    timestep = t_frames[:, 0] if uniform else t_frames  # [B], or [B, F] for the per-frame path
    return model(x_t.to(dtype), timestep.float(), prompt_embeds.to(dtype), return_dict=False)[0].float()


def x0_prediction(x_t, v, sigma_frames):
    """x0 = x_t - sigma * v with one sigma per frame: sigma_frames [B, F]."""
    return x0_from_velocity(x_t, v, sigma_frames[:, None, :, None, None])


def kd_frame_losses(model, x_t, x0, t_frames, sigma_frames, uniform, prompt_embeds):
    """0.5 * MSE(x0_pred, x0_teacher) per frame [B, F], fp32; its mean is the seed's loss."""
    v = student_velocity(model, x_t, t_frames, uniform, prompt_embeds)
    return 0.5 * (x0_prediction(x_t, v, sigma_frames) - x0).pow(2).mean(dim=(1, 3, 4))


# ----------------------------------------------------------------------------------------------------------
# Previews: decoded held-out samples, teacher 48-step | teacher K-step | student K-step, side by side

PREVIEW_FRAMES = 5  # columns of a preview strip: frames evenly spaced from the first to the last


def has_vae(init_from):
    """Whether the model directory (or hub id) has a vae/ component to decode previews with."""
    from diffusers import AutoencoderKLWan

    path = ensure_model_dir(init_from)
    if os.path.isdir(path):
        return os.path.exists(os.path.join(path, "vae", "config.json"))
    try:
        AutoencoderKLWan.load_config(path, subfolder="vae")
    except OSError:
        return False
    return True


def load_vae(init_from, device):
    """The model directory's AutoencoderKLWan, fp32 (as WanPipeline decodes), eval mode."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):  # loading must not move the training RNG (bit-exact resumes)
        vae = AutoencoderKLWan.from_pretrained(ensure_model_dir(init_from), subfolder="vae", torch_dtype=torch.float32)
    return vae.to(device).eval()


@torch.no_grad()
def decode_latents(vae, latents):
    """Video [3, F', H', W'] in [-1, 1] from normalised latents [C, F, H, W], un-normalised as WanPipeline does."""
    mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(-1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=latents.device).view(-1, 1, 1, 1)
    video = vae.decode((latents.float() / inv_std + mean)[None], return_dict=False)[0]  # [1, 3, F', H', W']
    return video[0].float().cpu()


def to_uint8(video):
    """[-1, 1] -> 0..255 uint8, same shape."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def preview_strip(rows, num_frames=PREVIEW_FRAMES):
    """Image [H * len(rows), W * num_frames, 3] uint8: row r is video rows[r] [3, F, H, W] at evenly spaced frames."""
    frames = torch.linspace(0, rows[0].shape[1] - 1, num_frames).round().long().tolist()
    grid = torch.cat([torch.cat([video[:, f] for f in frames], dim=2) for video in rows], dim=1)  # [3, H*R, W*n]
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
    """For each (index, [latents [C, F, H, W] per row]) in `samples`: sample-{index}.png, a strip of len(labels) rows
    by PREVIEW_FRAMES frames, and sample-{index}.mp4 (the rows stacked, every frame) when imageio can write MP4."""
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
        f.write("rows, top to bottom: " + " | ".join(labels) + f"; columns: {PREVIEW_FRAMES} frames, first to last\n")


# ----------------------------------------------------------------------------------------------------------
# Training


def lr_lambda(cfg):
    t = cfg.training

    def factor(step):
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "cosine":
            progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def plain(obj):
    """Config -> plain dicts and lists (for YAML and JSON)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj


def checkpoint_dirs(output_dir):
    """{step: path} of the complete checkpoints (temporary folders of interrupted saves are not listed)."""
    found = {}
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            step = name.removeprefix("checkpoint-")
            path = os.path.join(output_dir, name)
            if step.isdigit() and os.path.exists(os.path.join(path, "trainer_state.pt")):
                found[int(step)] = path
    return dict(sorted(found.items()))


def logged_step(line):
    """The step of a metrics.jsonl / eval.jsonl line; a blank or torn line (a write cut short) sorts last."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def next_batch(batches):
    """The next DataLoader batch; a cache file that failed to read or verify is raised here as its CacheError."""
    batch = next(batches)
    if "error" in batch:
        raise CacheError(batch["error"])
    return batch


def checkpoint_failure(error):
    """One line for a failed checkpoint write: the first rank's own exception for a CheckpointException."""
    failures = getattr(error, "failures", None)
    if failures:
        rank, (exc, _stack) = next(iter(failures.items()))
        return f"rank {rank}: {one_line(exc)}"
    return one_line(error)


class KDTrainer:
    """The KD run: the student learns x0 from the teacher's cached states at its t_list timesteps."""

    def __init__(self, cfg, rank, world_size, device):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.t_list = [float(t) for t in cfg.method.t_list]
        self.num_steps = len(self.t_list) - 1  # K
        self.first_bad_step = torch.tensor(float("inf"), device=device)  # of a non-finite loss or gradient norm

    def sample_step_indices(self, generator, batch_size, num_frames):
        """Per-frame student step indices [B, F] in [0, K): one uniform draw per sample, shared by its frames."""
        return torch.randint(self.num_steps, (batch_size, 1), generator=generator).expand(batch_size, num_frames)

    # -- set-up ------------------------------------------------------------------------------------------

    def prepare(self):
        """Cache (generated if needed), references from the teacher, then the student, optimizer and data."""
        cfg, t = self.cfg, self.cfg.training
        self.ensure_cache()
        self.meta = open_cache(cfg)
        recorded = self.meta["timesteps"]
        self.positions = state_positions(cfg, recorded)
        self.t_values = torch.tensor(self.t_list[:-1], device=self.device)  # [K] as written, for conditioning
        self.sigmas = torch.tensor([recorded[p] / NUM_TRAIN_TIMESTEPS for p in self.positions],
                                   device=self.device)  # [K] matched, for x0 = x_t - sigma * v
        self.next_sigmas = torch.cat([self.sigmas[1:], self.sigmas.new_zeros(1)])
        n = self.meta["num_samples"]
        if t.eval_samples >= n:
            raise ConfigError(f"training.eval_samples={t.eval_samples} must be below the {n} cached samples")
        self.train_indices, self.eval_indices = list(range(n - t.eval_samples)), list(range(n - t.eval_samples, n))
        self.dataset = TrajectoryDataset(cfg.method.teacher_path_cache, self.positions, self.meta["max_sequence_length"])
        make_dirs(t.output_dir)
        if self.rank == 0:  # export.py reads it to find the student's base model
            write_atomic(os.path.join(t.output_dir, "config.yaml"), lambda p: _write_lines(
                p, [yaml.safe_dump(plain(cfg), sort_keys=False, allow_unicode=True)]))
        self.references = self.load_references()
        self.preview_indices = self.eval_indices[: t.preview_samples] if t.previews else []
        if self.preview_indices and not has_vae(cfg.models.student.init_from):
            self.log(f"previews off: {cfg.models.student.init_from} has no vae/ to decode them with")
            self.preview_indices = []
        self.teacher_k_step = {}  # {index: the teacher's own K-step x0}: this rank's eval stride, rank 0's previews
        if cfg.models.teacher is not None and self.eval_indices:
            self.teacher_k_step = self.teacher_rollouts(self.teacher_rollout_indices())
        if cfg.models.teacher is not None and "teacher" not in self.references and self.eval_indices:
            self.references["teacher"] = self.teacher_rollout_error()
        free_device_memory(self.device)  # no teacher or text encoder is left before the student's optimizer
        self.model = build_student(cfg, self.device)
        if self.model.config.in_channels != self.meta["latent_shape"][0]:
            raise ConfigError(f"the student takes {self.model.config.in_channels} latent channels, the cache holds "
                              f"{self.meta['latent_shape'][0]}")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=tuple(t.betas),
                                           weight_decay=t.weight_decay, eps=t.eps, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step = 0
        self.vae = None  # loaded on rank 0 at the first preview
        self.resume()
        self.trim_logs()
        if "untrained" not in self.references and self.eval_indices:
            if self.step:
                raise CacheError("cannot measure the untrained student's reference on a resumed run: "
                                 f"{self.reference_path()} is missing")
            self.references["untrained"] = self.evaluate()["rollout_error"]
        self.save_references()

    def ensure_cache(self):
        if os.path.exists(os.path.join(self.cfg.method.teacher_path_cache, "COMPLETE")):
            return
        if self.cfg.models.teacher is None:
            open_cache(self.cfg)  # raises the seed's error
        import generate_cache

        generate_cache.generate_cache(self.cfg, self.rank, self.world_size, self.device)

    def reference_path(self):
        return os.path.join(self.cfg.training.output_dir, "eval_reference.json")

    def load_references(self):
        path = self.reference_path()
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return {}

    def save_references(self):
        if self.rank == 0:
            write_json_atomic(self.reference_path(), self.references)
        barrier()

    def data_loader(self, start):
        t = self.cfg.training
        sampler = KDBatchSampler(self.train_indices, t.batch_size, self.rank, self.world_size, t.seed,
                                 self.meta["latent_shape"][1], self.sample_step_indices, start)
        workers = dict(num_workers=t.num_workers, prefetch_factor=t.prefetch_factor, persistent_workers=True) \
            if t.num_workers else {}
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, pin_memory=self.device.type == "cuda",
                                           collate_fn=collate, **workers)

    # -- checkpoints --------------------------------------------------------------------------------------

    def state_dict_pair(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def save_checkpoint(self):
        import torch.distributed.checkpoint as dcp

        from torch.distributed.checkpoint.api import CheckpointException

        out = self.cfg.training.output_dir
        final = os.path.join(out, f"checkpoint-{self.step}")
        tmp = final + TMP_SUFFIX
        if not self.weights_are_finite():
            raise FloatingPointError(f"non-finite weights after step {self.step}; not saving checkpoint-{self.step}")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            make_dirs(tmp)
        barrier()
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}
        try:
            dcp.save(self.state_dict_pair(), checkpoint_id=tmp)
            torch.save(rng, os.path.join(tmp, f"rng-rank{self.rank}.pt"))
        except (OSError, RuntimeError, CheckpointException) as e:  # CheckpointException gathers every rank's failure
            if self.rank == 0:  # free the space a full disk needs back; every rank's dcp.save has returned
                shutil.rmtree(tmp, ignore_errors=True)
            raise WriteError(f"writing checkpoint {tmp}: {checkpoint_failure(e)}") from None
        barrier()
        if self.rank == 0:
            state = {"step": self.step, "micro_batches": self.step * self.cfg.training.grad_accum_steps,
                     "scheduler": self.scheduler.state_dict(), "world_size": self.world_size}
            write_atomic(os.path.join(tmp, "trainer_state.pt"), lambda p: torch.save(state, p))
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)  # the folder appears under its final name only when complete
            for step, path in list(checkpoint_dirs(out).items())[: -self.cfg.training.keep_checkpoints]:
                shutil.rmtree(path)
        barrier()

    def weights_are_finite(self):
        """Whether every rank's shard of the student's parameters is finite."""
        # DTensor shards, or plain tensors while FSDP2 holds the root unsharded (after an eval forward)
        local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                    for p in self.model.parameters())
        flag = torch.tensor(float(local), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def resume(self):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        t = self.cfg.training
        if self.rank == 0 and os.path.isdir(t.output_dir):
            for name in os.listdir(t.output_dir):  # saves interrupted by a crash
                if name.startswith("checkpoint-") and name.endswith(TMP_SUFFIX):
                    shutil.rmtree(os.path.join(t.output_dir, name), ignore_errors=True)
        barrier()
        found = checkpoint_dirs(t.output_dir)
        if t.resume == "never":
            if found:
                raise ConfigError(f"training.output_dir {t.output_dir} already holds checkpoints "
                                  f"{list(found.values())}; use training.resume=auto or another output_dir")
            return
        path = found[max(found)] if found and t.resume == "auto" else (t.resume if t.resume != "auto" else None)
        if path is None:
            return
        if not os.path.exists(os.path.join(path, "trainer_state.pt")):
            raise ConfigError(f"training.resume: {path} is not a complete checkpoint folder")
        state = self.state_dict_pair()
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        trainer = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.step = trainer["step"]
        rng_path = os.path.join(path, f"rng-rank{self.rank}.pt")
        if os.path.exists(rng_path):  # absent when resuming on more ranks than wrote the checkpoint
            rng = torch.load(rng_path, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"])
        self.log(f"resumed from {path} at step {self.step}")

    def trim_logs(self):
        """Drop the log lines past the starting step: a killed or failed run logged them after its last checkpoint
        (or before its first), and they are logged again from here."""
        if self.rank == 0:
            for name in ("metrics.jsonl", "eval.jsonl"):
                log_path = os.path.join(self.cfg.training.output_dir, name)
                if os.path.exists(log_path):
                    with open(log_path) as f:
                        kept = [line for line in f if logged_step(line) <= self.step]
                    write_atomic(log_path, lambda p, lines=kept: _write_lines(p, lines))

    # -- evaluation ---------------------------------------------------------------------------------------

    def load_eval_sample(self, index):
        """(states [K, C, F, H, W] at the t_list entries, teacher x0 [C, F, H, W], embeds [1, max_len, D]) on device."""
        keys = [(index, (k,) * self.meta["latent_shape"][1]) for k in range(self.num_steps)]
        items = [self.dataset[key] for key in keys]
        states = torch.stack([item["x_t"] for item in items]).to(self.device).float()
        return states, items[0]["x0"].to(self.device).float(), items[0]["prompt_embeds"][None].to(self.device).float()

    def rank_share(self, indices):
        """This rank's stride of `indices`, padded with weight-0 repeats so every rank runs as many forwards."""
        per_rank = -(-len(indices) // self.world_size)
        mine = indices[self.rank :: self.world_size]
        return [(i, 1.0) for i in mine] + [(indices[0], 0.0)] * (per_rank - len(mine))

    @torch.no_grad()
    def evaluate(self):
        """Held-out KD loss per t_list entry and the student's K-step rollout error against the teacher's x0."""
        self.model.eval()
        K = self.num_steps
        sums = torch.zeros(K + 1, device=self.device, dtype=torch.float64)  # [K per-entry losses, rollout error]
        for index, weight in self.rank_share(self.eval_indices):
            states, x0, embeds = self.load_eval_sample(index)
            frames = states.shape[2]
            t_frames = self.t_values[:, None].expand(K, frames)
            losses = kd_frame_losses(self.model, states, x0[None], t_frames, self.sigmas[:, None].expand(K, frames),
                                     True, embeds.expand(K, -1, -1))  # [K, F]
            sums[:K] += weight * losses.mean(dim=1).double()
            sums[K] += weight * (self.student_rollout(states[:1], embeds) - x0).pow(2).mean().double()
        dist.all_reduce(sums)
        sums /= len(self.eval_indices)
        self.model.train()
        result = {f"loss_t{self.t_list[k]:g}": sums[k].item() for k in range(K)}
        result["loss"] = sums[:K].mean().item()
        result["rollout_error"] = sums[K].item()
        return result

    def student_rollout(self, noise, embeds):
        """The student's deterministic K-step sampling through t_list from the cached initial state; x0 [C, F, H, W]."""
        x = noise  # [1, C, F, H, W]
        for k in range(self.num_steps):
            t = self.t_values[k : k + 1, None].expand(1, x.shape[2])
            x0 = x0_prediction(x, student_velocity(self.model, x, t, True, embeds), self.sigmas[k : k + 1, None])
            eps = (x - (1 - self.sigmas[k]) * x0) / self.sigmas[k]
            x = add_noise(x0, eps, self.next_sigmas[k])
        return x0[0]

    def teacher_rollout_indices(self):
        """Eval samples this rank rolls the teacher out on: its stride when the reference is missing, previews on 0."""
        mine = self.eval_indices[self.rank :: self.world_size] if "teacher" not in self.references else []
        return sorted(set(mine) | set(self.preview_indices if self.rank == 0 else []))

    @torch.no_grad()
    def teacher_rollouts(self, indices):
        """{index: x0 [C, F, H, W]} of the teacher's own K-step sampling (same grid points as the student, with CFG)."""
        import generate_cache

        if not indices:
            return {}
        teacher = load_transformer(self.cfg.models.teacher.init_from, self.device, compute_dtype(self.device))
        teacher.eval().requires_grad_(False)
        negative = read_negative_embeds(self.cfg.method.teacher_path_cache)
        negative = pad_embeds(negative, self.meta["max_sequence_length"])[None].to(self.device).float()
        out = {}
        for index in indices:
            states, _, embeds = self.load_eval_sample(index)
            out[index] = generate_cache.teacher_rollout(teacher, states[:1], embeds, negative,
                                                        self.sigmas.double().cpu(),
                                                        self.cfg.method.teacher_guidance_scale, [])[0, -1]
        del teacher
        return out

    def teacher_rollout_error(self):
        """MSE of the teacher's own K-step sampling vs its 48-step x0 over the eval samples (all ranks together)."""
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for index in self.eval_indices[self.rank :: self.world_size]:
            x0 = self.load_eval_sample(index)[1]
            total += (self.teacher_k_step[index] - x0).pow(2).mean().double()
        dist.all_reduce(total)
        return total.item() / len(self.eval_indices)

    @torch.no_grad()
    def write_eval_previews(self):
        """output_dir/previews/step-N/: decoded teacher 48-step | teacher K-step | student K-step of preview samples.

        Every rank runs the student's rollouts (the FSDP forward is collective); rank 0 decodes and writes.
        """
        self.model.eval()
        samples = []
        for index in self.preview_indices:
            states, x0, embeds = self.load_eval_sample(index)
            teacher_k = [self.teacher_k_step[index]] if index in self.teacher_k_step else []
            samples.append((index, [x0, *teacher_k, self.student_rollout(states[:1], embeds)]))
        self.model.train()
        if self.rank != 0:
            return
        if self.vae is None:
            self.vae = load_vae(self.cfg.models.student.init_from, self.device)
        K = self.num_steps
        labels = [f"teacher {self.cfg.method.teacher_inference_steps}-step x0", f"teacher {K}-step",
                  f"student {K}-step"]
        if not self.teacher_k_step:
            labels.pop(1)
        folder = os.path.join(self.cfg.training.output_dir, "previews", f"step-{self.step}")
        write_previews(folder, self.vae, samples, labels)
        self.log(f"previews ({' | '.join(labels)}) written to {folder}")

    # -- the loop -----------------------------------------------------------------------------------------

    def log(self, text):
        if self.rank == 0:
            tqdm.write(text)

    def append_jsonl(self, name, record):
        if self.rank == 0:
            path = os.path.join(self.cfg.training.output_dir, name)
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise WriteError(f"writing {path}: {one_line(e)}") from None
            if self.wandb is not None:
                self.wandb.log({f"{name.removesuffix('.jsonl')}/{k}": v for k, v in record.items()}, step=record["step"])

    def run_eval(self):
        result = self.evaluate()
        if self.preview_indices:
            self.write_eval_previews()
        refs = self.references
        record = {"step": self.step, **result, **{f"rollout_error_{k}": v for k, v in refs.items()}}
        self.append_jsonl("eval.jsonl", record)
        teacher = f"{refs['teacher']:.5f}" if "teacher" in refs else "n/a (no teacher configured)"
        per_entry = ", ".join(f"{k}={v:.5f}" for k, v in result.items() if k.startswith("loss_t"))
        self.log(f"eval step {self.step}: kd loss {result['loss']:.5f} ({per_entry}) | rollout error: student "
                 f"{result['rollout_error']:.5f}, untrained student {refs.get('untrained', float('nan')):.5f}, "
                 f"teacher {self.num_steps}-step {teacher}")
        return result

    def train_step(self, batches):
        """One optimizer step over grad_accum_steps micro-batches; (loss sums per entry [K], counts [K], grad norm)."""
        K, accum = self.num_steps, len(batches)
        entry_loss = torch.zeros(K, device=self.device)
        entry_count = torch.zeros(K, device=self.device)
        for i, batch in enumerate(batches):
            self.model.set_requires_gradient_sync(i == accum - 1)  # reduce-scatter once per optimizer step
            x_t = batch["x_t"].to(self.device, non_blocking=True).float()  # [B, C, F, H, W]
            x0 = batch["x0"].to(self.device, non_blocking=True).float()
            embeds = batch["prompt_embeds"].to(self.device, non_blocking=True).float()  # [B, max_len, D]
            steps = batch["steps"].to(self.device, non_blocking=True)  # [B, F]
            uniform = bool((batch["steps"] == batch["steps"][:, :1]).all())  # on the CPU copy: no device sync
            frame_loss = kd_frame_losses(self.model, x_t, x0, self.t_values[steps], self.sigmas[steps], uniform,
                                         embeds)  # [B, F]
            (frame_loss.mean() / accum).backward()
            with torch.no_grad():
                entry_loss.index_add_(0, steps.flatten(), frame_loss.detach().flatten())
                entry_count.index_add_(0, steps.flatten(), torch.ones_like(frame_loss).flatten())
        max_norm = self.cfg.training.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm if max_norm > 0 else float("inf"),
                                                   foreach=True)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        loss = entry_loss.sum() / entry_count.sum()
        # Noted on the device, read by check_finite: a host sync here would stall the GPU queue every step.
        bad = ~torch.isfinite(loss + grad_norm)
        self.first_bad_step = torch.where(bad & self.first_bad_step.isinf(), float(self.step + 1), self.first_bad_step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return entry_loss, entry_count, grad_norm

    def check_finite(self):
        """Stop if any step so far had a non-finite loss or gradient norm, before its weights are saved or used."""
        first = self.first_bad_step.clone()
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if torch.isfinite(first):
            raise FloatingPointError(f"non-finite loss or gradient norm at step {int(first)}; stopping without "
                                     "saving the weights of that step or later")

    def train(self):
        t = self.cfg.training
        self.wandb = None
        if t.wandb_project and self.rank == 0:
            import wandb

            self.wandb = wandb
            wandb.init(project=t.wandb_project, config=plain(self.cfg), dir=t.output_dir)
        self.model.train()
        accum = t.grad_accum_steps
        batches = iter(self.data_loader(start=self.step * accum))
        bar = tqdm(total=t.max_steps, initial=self.step, disable=self.rank != 0, desc="kd", dynamic_ncols=True)
        K = self.num_steps
        window = torch.zeros(2 * K + 1, device=self.device)  # per-entry loss sums, counts, grad-norm sum
        window_steps, window_start = 0, time.perf_counter()
        while self.step < t.max_steps:
            loss_sums, counts, grad_norm = self.train_step([next_batch(batches) for _ in range(accum)])
            window += torch.cat([loss_sums, counts, grad_norm.reshape(1).to(window.dtype)])
            window_steps += 1
            bar.update(1)
            last = self.step == t.max_steps
            log, evaluate = self.step % t.log_every == 0 or last, self.step % t.eval_every == 0 or last
            save = self.step % t.checkpoint_every == 0 or last
            if log or evaluate or save:
                self.check_finite()
            if log:
                dist.all_reduce(window)
                elapsed = time.perf_counter() - window_start
                sums, cnt = window[:K], window[K : 2 * K]
                record = {"step": self.step, "loss": (sums.sum() / cnt.sum()).item()}
                record.update({f"loss_t{self.t_list[k]:g}": (sums[k] / cnt[k]).item() if cnt[k] > 0 else None
                               for k in range(K)})
                record.update({"lr": self.scheduler.get_last_lr()[0],
                               "grad_norm": window[2 * K].item() / (window_steps * self.world_size),
                               "samples_per_s": window_steps * accum * t.batch_size * self.world_size / elapsed})
                self.append_jsonl("metrics.jsonl", record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                window.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if evaluate and self.eval_indices:
                self.run_eval()
            if save:
                self.save_checkpoint()
        bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def main(argv, trainer_cls=KDTrainer):
    cfg = config_from_argv(argv)
    check_paths(cfg)
    rank, world_size, device = init_distributed()
    torch.manual_seed(stable_seed(cfg.training.seed, rank))
    trainer = trainer_cls(cfg, rank, world_size, device)
    trainer.prepare()
    trainer.train()
    shutdown_distributed()


if __name__ == "__main__":
    import kd  # run the importable module, so this file's classes exist once (kd_causal imports kd too)

    kd.run_cli(kd.main, sys.argv[1:])
