"""The config: every field, its default and its meaning in DEFAULTS; loading, validation and the path checks.

A run's config is a YAML file plus `key.path=value` overrides (values parsed as YAML). Unknown keys, wrong
types, non-finite numbers and out-of-range values are each one ConfigError naming the dotted field.
"""

import csv
import difflib
import io
import json
import math
import os
import re
import sys

import torch
import yaml

from errors import ConfigError, one_line
from flow_matching import NUM_TRAIN_TIMESTEPS, teacher_grid
from teacher import teacher_experts


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
            "attention": "full",  # full | block_causal: frame block b self-attends only to blocks <= b
        },
        "teacher": {  # optional once the cache is complete; writes the trajectory cache
            "init_from": Opt(str),  # hub id or diffusers dir (transformer/, text_encoder/, tokenizer/, vae/)
            "trainable": False,  # must be false
        },
    },
    "method": {
        "teacher_path_cache": Opt(str),  # directory of the trajectory cache (created if missing)
        "t_list": [999, 937, 833, 624, 0],  # student timesteps (0..1000), strictly decreasing, ending at 0
        "student_sample_steps": Opt(int),  # number of student steps; defaults to len(t_list) - 1
        "teacher_guidance_scale": 1.0,  # classifier-free guidance g: uncond + g * (cond - uncond); 1 = no CFG
        # Two-expert (Wan2.2 A14B) teachers only, whose model_index.json names a transformer_2; their
        # teacher_guidance_scale is the high-noise expert's (Wan2.2-T2V-A14B: 4.0).
        # CFG g of the low-noise expert (Wan2.2-T2V-A14B: 3.0); unset: teacher_guidance_scale, as WanPipeline does
        "teacher_guidance_scale_2": Opt(float),
        "teacher_boundary_ratio": Opt(float),  # high-noise expert while t >= ratio * 1000; None: model_index's
        "teacher_inference_steps": 48,  # steps of the teacher's ODE
        # the teacher's ODE solver: euler (Self-Forcing's, CausVid's and Causal Forcing's pairs) | unipc (Wan's
        # published sampler, as diffusers' UniPCMultistepScheduler runs it; settings from the teacher's scheduler/)
        "teacher_solver": "euler",
        "teacher_negative_prompt": WAN_NEGATIVE_PROMPT,  # the unconditional prompt of CFG
        "teacher_cfg_forward": "batched",  # CFG as one forward of batch 2 | separate: two of batch 1
        "num_frames_per_block": 3,  # latent frames sharing one noise level (causal students)
        # the timestep the student is conditioned on at each t_list entry: grid = its matched teacher-grid point
        # (1000, 937.5, 833.33, 625 for the default t_list: what Self-Forcing and diffusers' schedulers call the
        # student at) | t_list = the value as written (the seed's)
        "student_timesteps": "grid",
        # causal students: each block may also draw the final clean entry (fed at timestep 0, no loss), the
        # clean context Self-Forcing's inference gives later blocks; false: the seed's K noisy entries only
        "clean_context": True,
        "t_list_tolerance": 1.0,  # max distance, in timesteps, of a t_list entry from its teacher grid point
        "keep_full_trajectory": False,  # cache every teacher state, not only those at t_list (bigger files)
        "recorded_steps": Opt(list),  # grid steps the cache holds states of (an imported LMDB's); default t_list's
        # causal ODE (an AR teacher, docs/causal.md): a complete cache whose x0 are the clean data latents that
        # the AR teacher sees as the context of each block (teacher forcing), sample i for sample i
        "context_cache": Opt(str),
        # image-to-video (docs/i2v.md): the first latent frame is the given image's clean latent (the first frame of
        # the teacher's x0): fed at timestep 0, never in the loss, and a causal student's first block of its own
        # ([1, b, b, ...] frames: Self-Forcing's independent_first_frame, Causal Forcing's --i2v)
        "first_frame_given": False,
    },
    "pipeline": {
        "flow_shift": 5.0,  # s in sigma' = s*sigma / (1 + (s-1)*sigma); Wan uses 5 at 480p
        "num_frames": 81,  # video frames (latent frames = (num_frames - 1) / vae temporal factor + 1)
        "height": 480,  # pixels
        "width": 832,  # pixels
        "max_sequence_length": 512,  # text tokens the teacher sees (prompt padded with zeros to this)
        "fps": 16,  # frames per second the videos are played at (Wan2.1's 16); export's student_sampling.json
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
        "ema_decay": 0.0,  # EMA of the weights: ema <- d * ema + (1 - d) * weights per step (0 = no EMA)
        "ema_start_step": 0,  # the EMA equals the weights up to this optimizer step, then averages
        "gradient_checkpointing": False,  # recompute each transformer block in backward (less memory)
        "seed": 0,  # data order and timestep draws
        "num_workers": 2,  # DataLoader worker processes per rank (0 = load in the training process)
        "prefetch_factor": 4,  # batches each worker loads ahead
        "log_every": 10,  # optimizer steps between metrics.jsonl lines
        "checkpoint_every": 500,  # optimizer steps between checkpoints (a final one is always written)
        "keep_checkpoints": 3,  # keep the latest K complete checkpoints
        "resume": "auto",  # auto: the highest complete checkpoint in output_dir | never | a checkpoint path
        "eval_every": 500,  # optimizer steps between evaluations on the held-out samples (and at the end)
        "eval_samples": 4,  # the last N cache samples are held out from training for evaluation
        "previews": True,  # at each eval, decode held-out samples (student's VAE) to output_dir/previews/
        "preview_samples": 2,  # held-out samples decoded per eval: the first eval samples (<= eval_samples)
        "wandb_project": Opt(str),  # log to this Weights & Biases project (wandb is imported only then)
    },
}

OPTIONAL_SECTIONS = ("models.student", "models.teacher")  # absent from the YAML means the role is absent
CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({one_line(e)})") from None


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
        raise ConfigError(f"config file {path} is not valid YAML: {one_line(e)}") from None
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
        isinstance(t, (int, float)) and not isinstance(t, bool)
        and not (isinstance(t, float) and math.isnan(t))
        for t in t_list
    ):
        raise ConfigError(
            "method_config.t_list must be a non-empty list of integer timestep values, "
            "e.g. [999, 937, 833, 624, 0]"
        )
    if m.student_sample_steps is None:
        m["student_sample_steps"] = len(t_list) - 1
    if len(t_list) != m.student_sample_steps + 1:
        raise ConfigError(
            f"len(t_list)={len(t_list)} must equal student_sample_steps+1={m.student_sample_steps + 1}"
        )
    if any(a <= b for a, b in zip(t_list, t_list[1:])) or t_list[-1] != 0 or len(t_list) < 2:
        raise ConfigError("method.t_list must be strictly decreasing and end at 0 (at least two entries), "
                          f"got {t_list}")
    if t_list[0] > 1000:
        raise ConfigError(f"method.t_list values must lie in [0, 1000], got {t_list}")
    if not m.teacher_path_cache or not m.teacher_path_cache.strip():
        raise ConfigError("method_config.teacher_path_cache must be set")
    if teacher is not None and teacher.trainable:
        raise ConfigError("KDMethod requires teacher to be non-trainable "
                          "(set trainable: false in models.teacher)")
    if m.num_frames_per_block < 1:
        raise ConfigError("num_frames_per_block must be >= 1")
    if not 1 <= m.teacher_inference_steps <= NUM_TRAIN_TIMESTEPS:
        raise ConfigError(f"method.teacher_inference_steps must be in [1, {NUM_TRAIN_TIMESTEPS}], "
                          f"got {m.teacher_inference_steps}")
    for key in ("teacher_guidance_scale", "teacher_guidance_scale_2"):
        if m[key] is not None and m[key] < 0:
            raise ConfigError(f"method.{key} must be >= 0, got {m[key]}")
    if m.teacher_boundary_ratio is not None and not 0 <= m.teacher_boundary_ratio <= 1:
        raise ConfigError(f"method.teacher_boundary_ratio must be in [0, 1], got {m.teacher_boundary_ratio}")
    if m.teacher_solver not in ("euler", "unipc"):
        raise ConfigError(f"method.teacher_solver must be 'euler' or 'unipc', got {m.teacher_solver!r}")
    if m.teacher_cfg_forward not in ("batched", "separate"):
        raise ConfigError("method.teacher_cfg_forward must be 'batched' or 'separate', "
                          f"got {m.teacher_cfg_forward!r}")
    if m.t_list_tolerance < 0:
        raise ConfigError("method.t_list_tolerance must be >= 0")
    if m.student_timesteps not in ("grid", "t_list"):
        raise ConfigError(f"method.student_timesteps must be 'grid' or 't_list', got {m.student_timesteps!r}")
    p = cfg.pipeline
    if p.flow_shift <= 0:
        raise ConfigError("pipeline.flow_shift must be > 0")
    for key in ("num_frames", "height", "width", "max_sequence_length", "fps"):
        if p[key] < 1:
            raise ConfigError(f"pipeline.{key} must be >= 1, got {p[key]}")
    check_recorded_steps(m)
    teacher_grid(cfg)  # off-grid t_list entries, and entries at steps the cache does not record, fail now
    if not 0 <= cfg.data.seed < 2**62:  # seed + i seeds a torch.Generator (64-bit)
        raise ConfigError(f"data.seed must be in [0, 2**62), got {cfg.data.seed}")
    if cfg.data.cache_dtype not in CACHE_DTYPES:
        raise ConfigError(f"data.cache_dtype must be one of {sorted(CACHE_DTYPES)}, "
                          f"got {cfg.data.cache_dtype!r}")
    if cfg.data.num_samples is not None and cfg.data.num_samples < 1:
        raise ConfigError("data.num_samples must be >= 1")
    if student.attention not in ("full", "block_causal"):
        raise ConfigError("models.student.attention must be 'full' or 'block_causal', "
                          f"got {student.attention!r}")
    t = cfg.training
    positive = ("max_steps", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every",
                "keep_checkpoints", "eval_every", "prefetch_factor")
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
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"training.ema_decay must be in [0, 1) (0 = no EMA), got {t.ema_decay}")
    if t.ema_start_step < 0:
        raise ConfigError(f"training.ema_start_step must be >= 0, got {t.ema_start_step}")
    if t.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"training.lr_schedule must be 'constant' or 'cosine', got {t.lr_schedule!r}")
    for role in ("student", "teacher"):
        section = cfg.models[role]
        if section is not None and not (section.init_from or "").strip():
            raise ConfigError(f"models.{role}.init_from must be set "
                              "(a hub id or a local diffusers directory)")


def check_recorded_steps(m):
    """method.recorded_steps: strictly increasing steps of the teacher's grid, not with keep_full_trajectory."""
    steps, n = m.recorded_steps, m.teacher_inference_steps
    if steps is None:
        return
    on_grid = all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < n for s in steps)
    if not steps or not on_grid or any(a >= b for a, b in zip(steps, steps[1:])):
        raise ConfigError(f"method.recorded_steps must be strictly increasing step indices in [0, {n}) of the "
                          f"teacher's grid, e.g. [0, 12, 24, 36], got {steps}")
    if m.keep_full_trajectory:
        raise ConfigError("method.recorded_steps and method.keep_full_trajectory exclude each other "
                          "(keep_full_trajectory records every step)")


def check_causal_ode(cfg):
    """An AR teacher needs method.context_cache (a complete cache) and the student's block size; a
    bidirectional teacher takes no context."""
    from ar_teacher import ar_frames_per_block

    m, teacher = cfg.method, cfg.models.teacher
    if m.context_cache is not None and not os.path.exists(os.path.join(m.context_cache, "COMPLETE")):
        raise ConfigError(f"method.context_cache: {m.context_cache} is not a complete trajectory cache (no "
                          "COMPLETE file); generate it first, or point at the cache whose x0 are your clean data")
    if teacher is None or not os.path.isdir(teacher.init_from):
        return
    frames = ar_frames_per_block(teacher.init_from)
    if frames is None and m.context_cache is not None:
        raise ConfigError(f"method.context_cache is set but the teacher {teacher.init_from} is bidirectional (no "
                          "block_causal_frames in its transformer/config.json); remove it, or use an AR teacher")
    if frames is not None and m.context_cache is None:
        raise ConfigError(f"the teacher {teacher.init_from} is an AR teacher: set method.context_cache to the "
                          "cache whose x0 are the clean data it sees as context")
    if frames is not None and frames != m.num_frames_per_block:
        raise ConfigError(f"the AR teacher {teacher.init_from} generates blocks of {frames} latent frames but "
                          f"method.num_frames_per_block is {m.num_frames_per_block}; they must be equal")


HUB_ID_RE = re.compile(r"[\w.-]+/[\w.-]+")  # from_pretrained looks such a name up on the hub


def check_paths(cfg):
    """The files and folders a run starts from, checked before anything loads: a ConfigError naming the field.

    A hub id ('namespace/name' with no such local path) passes: from_pretrained looks it up.
    """
    teacher_parts = ["transformer/config.json", "text_encoder/config.json", "tokenizer", "vae/config.json"]
    needs = {"student": ["transformer/config.json"], "teacher": teacher_parts}
    for role, parts in needs.items():
        section = cfg.models[role]
        path = section.init_from if section is not None else None
        if path is None or (not os.path.exists(path) and HUB_ID_RE.fullmatch(path)):
            continue
        if not os.path.isdir(path):
            raise ConfigError(f"models.{role}.init_from: {path} is not a directory (expected a diffusers Wan "
                              "directory or a hub id 'namespace/name')")
        absent = [part for part in parts if not os.path.exists(os.path.join(path, part))]
        if absent:
            raise ConfigError(f"models.{role}.init_from: {path} has no {', '.join(absent)} "
                              "(expected a diffusers Wan directory)")
    if cfg.data.prompts:
        read_prompts(cfg)
    teacher = cfg.models.teacher
    if teacher is not None and os.path.isdir(teacher.init_from):  # the video size against the VAE's factors
        latent_shape(teacher.init_from, cfg)
        experts = teacher_experts(cfg)["teacher_experts"]  # a second expert needs a boundary to switch at
        absent = [e for e in experts if not os.path.exists(os.path.join(teacher.init_from, e, "config.json"))]
        if absent:
            raise ConfigError(f"models.teacher.init_from: {teacher.init_from} has no {absent[0]}/config.json "
                              "(its model_index.json names that expert)")
    check_causal_ode(cfg)
    for field, path in (("method.teacher_path_cache", cfg.method.teacher_path_cache),
                        ("training.output_dir", cfg.training.output_dir)):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"{field}: {path} exists and is not a directory")
    resume = cfg.training.resume
    if resume not in ("auto", "never") and not os.path.exists(os.path.join(resume, "trainer_state.pt")):
        raise ConfigError(f"training.resume: {resume} is not a complete checkpoint folder "
                          "(expected auto, never or a checkpoint-N folder holding trainer_state.pt)")


def read_prompts(cfg):
    """The prompts of data.prompts, the first data.num_samples of them (prompt_rows)."""
    return [prompt for prompt, _ in prompt_rows(cfg)]


def prompt_rows(cfg):
    """[(prompt, image path or None)] of data.prompts, the first data.num_samples: a text file (one prompt per
    line, blank lines skipped), JSONL (one object per line: "prompt", and optionally "image") or CSV (columns
    prompt and, optionally, image). Image paths are relative to the prompts file's folder."""
    path = cfg.data.prompts
    if not path:
        raise ConfigError("data.prompts must be set (a text file with one prompt per line, or JSONL/CSV with "
                          "prompt and image)")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"data.prompts: file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.prompts: cannot read {path} as UTF-8 text ({e})") from None
    rows = _parse_rows(path, text)
    if not rows:
        raise ConfigError(f"data.prompts: {path} holds no prompts")
    n = cfg.data.num_samples
    if n is not None and n > len(rows):
        raise ConfigError(f"data.num_samples={n} but {path} holds only {len(rows)} prompts")
    folder = os.path.dirname(os.path.abspath(path))
    return [(prompt, os.path.join(folder, image) if image else None) for prompt, image in rows[:n]]


def _parse_rows(path, text):
    """[(prompt, image or None)] of a prompts file's text, by its extension; ConfigError naming the line."""
    if path.endswith(".jsonl"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"data.prompts: {path} line {number} is not JSON ({e})") from None
            rows.append(_checked_row(row, f"{path} line {number}"))
        return rows
    if path.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if "prompt" not in (reader.fieldnames or []):
            raise ConfigError(f"data.prompts: {path} has no 'prompt' column (found {reader.fieldnames})")
        return [_checked_row(row, f"{path} row {number}") for number, row in enumerate(reader, 1)]
    return [(line.strip(), None) for line in text.splitlines() if line.strip()]


def _checked_row(row, where):
    """(prompt, image or None) of one JSONL object or CSV row; ConfigError naming it."""
    if not isinstance(row, dict):
        raise ConfigError(f"data.prompts: {where}: expected an object with 'prompt' (and 'image')")
    unknown = sorted(set(row) - {"prompt", "image"})
    if unknown:
        raise ConfigError(f"data.prompts: {where}: unknown field(s) {unknown} (expected 'prompt' and 'image')")
    prompt, image = row.get("prompt"), row.get("image") or None
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"data.prompts: {where}: 'prompt' must be a non-empty string, got {prompt!r}")
    if image is not None and not isinstance(image, str):
        raise ConfigError(f"data.prompts: {where}: 'image' must be a file path, got {image!r}")
    return prompt.strip(), image


def latent_shape(init_from, cfg):
    """[C, F, H, W] of the teacher's latents for the configured video size, from configs only (no weights)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    vae = AutoencoderKLWan.load_config(init_from, subfolder="vae")
    transformer = WanTransformer3DModel.load_config(init_from, subfolder="transformer")
    channels = transformer.get("out_channels") or transformer["in_channels"]  # an I2V model takes more than that
    t_factor, s_factor = vae.get("scale_factor_temporal", 4), vae.get("scale_factor_spatial", 8)
    p = cfg.pipeline
    if (p.num_frames - 1) % t_factor or p.height % (2 * s_factor) or p.width % (2 * s_factor):
        raise ConfigError(
            f"pipeline.num_frames - 1 must be a multiple of {t_factor} and pipeline.height/width multiples "
            f"of {2 * s_factor}, got {p.num_frames}x{p.height}x{p.width}"
        )
    return [channels, (p.num_frames - 1) // t_factor + 1, p.height // s_factor, p.width // s_factor]


def plain(obj):
    """Config -> plain dicts and lists (for YAML and JSON)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj


def config_from_argv(argv):
    """The config named by a script's command line: CONFIG.yaml [key.path=value ...]."""
    if not argv or argv[0].startswith("-"):
        raise SystemExit(f"usage: {os.path.basename(sys.argv[0])} CONFIG.yaml [key.path=value ...]")
    return load_config(argv[0], argv[1:])
