"""Export a KD training checkpoint as a diffusers Wan directory: the `ode_init` student.

    python export.py --checkpoint runs/kd --output-dir exports/wan_kd_4step --verify
    python export.py --checkpoint runs/kd/checkpoint-2000 --output-dir exports/kd --dtype bf16 --overwrite \
        --self-forcing exports/ode_init.pt
    python export.py --checkpoint runs/kd --output-dir exports/kd_ema --ema    # the EMA weights (training.ema_decay)

--checkpoint is a run's output directory (its latest complete checkpoint is used) or one checkpoint-N folder;
one CPU process exports a checkpoint written by any number of ranks. The output holds the student base model's
other components (hard-linked where possible) and transformer/ from save_pretrained, so that
WanPipeline.from_pretrained(DIR) loads it, and student_sampling.json: everything stock WanPipeline needs to
sample the student as it was trained (sigmas and timesteps for a FlowMatchEulerDiscreteScheduler, guidance, text
length, frames, size, fps; the README's snippet reads it).
A block-causal student's transformer/config.json records its block size (block_causal_frames): the export of
ar_diffusion.py's run is the AR teacher directory of causal ODE (docs/causal.md).
--self-forcing also writes the weights in the original Wan key layout that Self-Forcing's generator
checkpoints use: {"generator": {"model.<wan key>": tensor}}, plus "generator_ema" when the run kept an EMA
(Self-Forcing's inference.py --use_ema reads it).
"""

import argparse
import json
import os
import shutil
import sys
import warnings

import torch

from ar_teacher import AR_CONFIG_KEY, FIRST_FRAME_KEY
from atomic_files import TMP_SUFFIX, write_atomic
from checkpoints import TRAINER_STATE, checkpoint_dirs, has_ema
from config import latent_shape, load_config
from errors import CacheError, ConfigError, run_cli
from flow_matching import conditioning_timesteps, teacher_grid
from models import load_transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# diffusers name piece -> original Wan name piece, in order (the inverse of diffusers' single-file loader)
TO_WAN_KEYS = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1.", "self_attn."),
    ("attn2.", "cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".norm2.", ".norm3."),  # Wan calls its affine cross-attention norm norm3
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
]
SELF_FORCING_PREFIX = "model."  # Self-Forcing's generator wraps the Wan model as `.model`


def find_checkpoint(path):
    """The checkpoint folder to export: `path` itself, or the highest complete checkpoint-N under it."""
    if not os.path.isdir(path):
        raise ConfigError(f"--checkpoint {path} does not exist")
    if os.path.exists(os.path.join(path, TRAINER_STATE)):
        return path
    found = checkpoint_dirs(path)
    if not found:
        raise ConfigError(f"--checkpoint {path} holds no complete checkpoint (a checkpoint-N folder with "
                          "trainer_state.pt); incomplete checkpoint-N.tmp folders are never exported")
    return found[max(found)]


def run_config(checkpoint):
    """The resolved config the run saved beside its checkpoints."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"{path} is missing: export needs the run's config.yaml next to its checkpoints")
    return load_config(path)


def base_model_dir(init_from):
    """A local directory holding the student base model (a hub id resolves to its local snapshot)."""
    if os.path.isdir(init_from):
        return init_from
    from huggingface_hub import snapshot_download

    return snapshot_download(init_from)


def load_checkpoint_student(checkpoint, cfg, ema=False):
    """The student WanTransformer3DModel, fp32, with the checkpoint's weights or their EMA (DCP shards, any
    rank count)."""
    import torch.distributed.checkpoint as dcp

    model = load_transformer(cfg.models.student.init_from, torch.device("cpu"))
    if ema and not has_ema(checkpoint):
        raise ConfigError(f"--ema: checkpoint {checkpoint} holds no EMA (its run had training.ema_decay=0)")
    key = "ema" if ema else "model"
    # the EMA covers the parameters; buffers, if any, are the model's
    state = {key: dict(model.named_parameters()) if ema else model.state_dict()}
    try:
        with warnings.catch_warnings():  # a single process reading any rank count's shards is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=checkpoint, no_dist=True)
    except Exception as e:
        raise CacheError(f"cannot read the {key} weights from checkpoint {checkpoint}: "
                         f"{type(e).__name__}: {e}") from None
    model.load_state_dict({**model.state_dict(), **state[key]}, strict=True)
    return model.eval()


def sampling_schedule(cfg):
    """How the student samples as it was trained (student_sampling.json): Euler steps at its K sigmas, conditioned
    on its timesteps, without CFG (it learned the guided teacher's trajectories), on the trained text length and
    video shape; where those came from; and, for a block-causal student, its blocks (it streams them in
    Self-Forcing's inference, which stock WanPipeline cannot)."""
    p, m, student = cfg.pipeline, cfg.method, cfg.models.student
    causal = student.attention == "block_causal"
    return {"sigmas": teacher_grid(cfg).student_sigmas, "timesteps": conditioning_timesteps(cfg),
            "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "shift": 1.0}, "guidance_scale": 1.0,
            "max_sequence_length": p.max_sequence_length, "num_frames": p.num_frames, "height": p.height,
            "width": p.width, "fps": p.fps, "attention": student.attention,
            "num_frames_per_block": m.num_frames_per_block if causal else None,
            # image-to-video: the first latent frame is the image's clean latent, at timestep 0 (docs/i2v.md)
            "first_frame_given": m.first_frame_given,
            # the lines Self-Forcing's (and Causal Forcing's) config needs to stream a causal student as trained
            "self_forcing_config": {"num_frame_per_block": m.num_frames_per_block,
                                    "independent_first_frame": m.first_frame_given} if causal else None,
            "t_list": m.t_list, "flow_shift": p.flow_shift, "teacher_inference_steps": m.teacher_inference_steps,
            "teacher_solver": m.teacher_solver, "teacher_guidance_scale": m.teacher_guidance_scale}


def to_wan_keys(state_dict):
    """diffusers WanTransformer3DModel keys -> original Wan keys, with Self-Forcing's generator prefix."""
    out = {}
    for key, value in state_dict.items():
        if key == "scale_shift_table":
            new = "head.modulation"
        elif key.endswith(".scale_shift_table"):
            new = key.replace("scale_shift_table", "modulation")
        else:
            new = key
            for old, wan in TO_WAN_KEYS:
                new = new.replace(old, wan)
        out[SELF_FORCING_PREFIX + new] = value
    return out


def from_wan_keys(state_dict):
    """The inverse, done by diffusers' own original-Wan loader (an independent check of to_wan_keys)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    stripped = {k.removeprefix(SELF_FORCING_PREFIX): v for k, v in state_dict.items()}
    return convert_wan_transformer_to_diffusers(stripped)


def self_forcing_weights(model, dtype):
    """The model's weights in `dtype` under Self-Forcing's generator keys, checked to convert back exactly."""
    weights = {k: v.to(dtype) for k, v in model.state_dict().items()}
    wan = to_wan_keys(weights)
    back = from_wan_keys(dict(wan))
    if back.keys() != weights.keys() or any(not torch.equal(back[k], weights[k]) for k in weights):
        raise RuntimeError("the original-Wan key conversion does not round-trip through diffusers' loader")
    return wan


def mark_image_to_video(folder):
    """Set expand_timesteps in the export's model_index.json (a new file: the old may be a hard link into the base
    model): WanImageToVideoPipeline then gives the first frame's tokens timestep 0, as the student was trained."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.exists(path):  # a bare layout: pass expand_timesteps=True to from_pretrained instead
        return
    with open(path) as f:
        index = json.load(f)
    os.remove(path)
    with open(path, "w") as f:
        json.dump({**index, "expand_timesteps": True}, f, indent=2)


def link_or_copy_tree(src, dst, skip):
    """Mirror `src` into `dst` with hard links (copies across file systems), leaving out top-level `skip`."""
    for root, dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        if rel == "." and skip in dirs:
            dirs.remove(skip)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in files:
            source, target = os.path.realpath(os.path.join(root, name)), os.path.join(dst, rel, name)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)


def verify_export(output_dir, model, dtype):
    """Reload what was written and compare it with the checkpoint's weights and outputs; a summary line."""
    from diffusers import WanTransformer3DModel

    reloaded = WanTransformer3DModel.from_pretrained(output_dir, subfolder="transformer", torch_dtype=dtype)
    expected, found = model.state_dict(), reloaded.state_dict()
    if expected.keys() != found.keys():
        raise RuntimeError(f"exported keys differ: missing {sorted(expected.keys() - found.keys())[:5]}, "
                           f"unexpected {sorted(found.keys() - expected.keys())[:5]}")
    for key, value in expected.items():  # bf16 export: exactly the checkpoint rounded to bf16
        if not torch.equal(found[key].to(dtype), value.to(dtype)):
            raise RuntimeError(f"exported tensor {key} differs from the checkpoint")
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, 3, 8, 8, generator=g)
    text = torch.randn(1, 16, cfg.text_dim, generator=g)
    t = torch.tensor([937.0])
    with torch.no_grad():
        want = model(x, t, text, return_dict=False)[0]
        got = reloaded.float()(x, t, text, return_dict=False)[0]
    error = ((got - want).abs().max() / want.abs().max()).item()
    tolerance = 0.0 if dtype == torch.float32 else 0.05  # bf16 weights: ~2^-8 relative rounding per tensor
    if error > tolerance:
        raise RuntimeError(f"exported model's output differs from the checkpoint's by {error:.3g} "
                           "(max relative)")
    return f"verified: {len(expected)} tensors equal, forward max relative difference {error:.2g}"


def export(checkpoint, output_dir, dtype="fp32", overwrite=False, check=False, self_forcing=None, ema=False):
    """Write the checkpoint's student (its EMA weights with `ema`) as a diffusers Wan directory; returns the
    checkpoint folder used."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if os.path.exists(output_dir) and not overwrite:
        raise ConfigError(f"--output-dir {output_dir} already exists; pass --overwrite to replace it")
    checkpoint = find_checkpoint(checkpoint)
    cfg = run_config(checkpoint)
    if self_forcing and cfg.models.student.attention == "block_causal":
        check_whole_blocks(cfg, checkpoint)
    model = load_checkpoint_student(checkpoint, cfg, ema)
    if cfg.models.student.attention == "block_causal":  # its attention pattern: an AR teacher's directory
        model.register_to_config(**{AR_CONFIG_KEY: cfg.method.num_frames_per_block})
        if cfg.method.first_frame_given:
            model.register_to_config(**{FIRST_FRAME_KEY: True})
    torch_dtype = DTYPES[dtype]
    tmp = os.path.normpath(output_dir) + TMP_SUFFIX
    shutil.rmtree(tmp, ignore_errors=True)
    link_or_copy_tree(base_model_dir(cfg.models.student.init_from), tmp, skip="transformer")
    model.to(torch_dtype).save_pretrained(os.path.join(tmp, "transformer"), safe_serialization=True,
                                          max_shard_size="5GB")
    model.float()
    with open(os.path.join(tmp, "student_sampling.json"), "w") as f:
        json.dump(sampling_schedule(cfg), f, indent=1)
    if cfg.method.first_frame_given and cfg.models.student.attention == "full":
        mark_image_to_video(tmp)
    messages = [f"exported {checkpoint} ({dtype}{', EMA weights' if ema else ''}) to {output_dir}"]
    if check:
        messages.append(verify_export(tmp, model, torch_dtype))
    if self_forcing:
        students = {"generator": model if not ema else load_checkpoint_student(checkpoint, cfg)}
        if has_ema(checkpoint):
            students["generator_ema"] = model if ema else load_checkpoint_student(checkpoint, cfg, ema=True)
        generators = {name: self_forcing_weights(student, torch_dtype) for name, student in students.items()}
        write_atomic(self_forcing, lambda p: torch.save(generators, p))
        messages.append(f"wrote {self_forcing} ({' and '.join(generators)} in Self-Forcing's generator layout, "
                        "round-trip checked)")
        if cfg.models.student.attention == "block_causal":
            lines = sampling_schedule(cfg)["self_forcing_config"]
            messages.append("its Self-Forcing config: " + ", ".join(f"{k}: {str(v).lower()}" for k, v in lines.items())
                            + (" (inference.py --i2v)" if cfg.method.first_frame_given else ""))
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    os.rename(tmp, output_dir)
    print("\n".join(messages))
    return checkpoint


def check_whole_blocks(cfg, checkpoint):
    """ConfigError unless the run's block size divides its latent frames: Self-Forcing's and Causal Forcing's
    causal inference generate whole blocks only (they assert num_frames % num_frame_per_block == 0)."""
    frames, block = latent_shape(cfg.models.student.init_from, cfg)[1], cfg.method.num_frames_per_block
    given = "after the given first frame " if cfg.method.first_frame_given else ""
    if (frames - cfg.method.first_frame_given) % block:
        raise ConfigError(f"--self-forcing: {checkpoint}'s run has {frames} latent frames (pipeline.num_frames="
                          f"{cfg.pipeline.num_frames}), {given}not a multiple of method.num_frames_per_block="
                          f"{block}; Self-Forcing's causal inference runs whole blocks only (export without "
                          "--self-forcing)")


FSDP_PREFIX = "_fsdp_wrapped_module."  # FSDP1's wrapper names, in Causal Forcing's EMA copies


def convert_causal_forcing(path, base, output_dir, frames_per_block, ema=False, overwrite=False):
    """Causal Forcing's released AR teacher (its ar_diffusion.pt: {"generator": {"model.<Wan key>": tensor}},
    "generator_ema" when kept, names maybe FSDP-wrapped) as our AR teacher directory: `base`'s other components,
    its transformer config with these weights, every key matched (strictly), block_causal_frames recorded."""
    if os.path.exists(output_dir) and not overwrite:
        raise ConfigError(f"--output-dir {output_dir} already exists; pass --overwrite to replace it")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CacheError(f"--causal-forcing: cannot read {path}: {type(e).__name__}: {e}") from None
    key = "generator_ema" if ema else "generator"
    if not isinstance(saved, dict) or key not in saved:
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ConfigError(f"--causal-forcing: {path} has no {key!r} entry (found {found}); expected Causal "
                          "Forcing's {'generator': {'model.<Wan key>': tensor}, ...}")
    weights = from_wan_keys({k.replace(FSDP_PREFIX, ""): v for k, v in saved[key].items()})
    model = load_transformer(base, torch.device("cpu"))
    missing, unexpected = (sorted(set(a) - set(b)) for a, b in ((model.state_dict(), weights),
                                                                 (weights, model.state_dict())))
    if missing or unexpected:
        raise ConfigError(f"--causal-forcing: {path}'s {key} does not match {base}'s transformer: "
                          f"{len(missing)} missing ({', '.join(missing[:3])}), {len(unexpected)} unexpected "
                          f"({', '.join(unexpected[:3])}); nothing written")
    model.load_state_dict(weights, strict=True)
    model.register_to_config(**{AR_CONFIG_KEY: frames_per_block})
    tmp = os.path.normpath(output_dir) + TMP_SUFFIX
    shutil.rmtree(tmp, ignore_errors=True)
    link_or_copy_tree(base_model_dir(base), tmp, skip="transformer")
    model.save_pretrained(os.path.join(tmp, "transformer"), safe_serialization=True, max_shard_size="5GB")
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    os.rename(tmp, output_dir)
    print(f"converted {path} ({key}, {len(weights)} tensors) to the AR teacher directory {output_dir} "
          f"(blocks of {frames_per_block} latent frames)")


def main(argv):
    """export.py --checkpoint RUN_OR_CHECKPOINT --output-dir DIR [--dtype D] [--verify] [--self-forcing F], or
    export.py --causal-forcing AR_DIFFUSION_PT --base WAN_DIR --frames-per-block N --output-dir DIR [--ema]."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run's output_dir or one checkpoint-N folder")
    source.add_argument("--causal-forcing", metavar="FILE",
                        help="instead: convert Causal Forcing's ar_diffusion.pt to an AR teacher directory")
    parser.add_argument("--base", help="with --causal-forcing: the Wan directory or hub id it was trained from")
    parser.add_argument("--frames-per-block", type=int,
                        help="with --causal-forcing: its latent frames per block (chunkwise 3, framewise 1)")
    parser.add_argument("--output-dir", required=True, help="the diffusers Wan directory to write")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="dtype of the exported weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    parser.add_argument("--verify", action="store_true",
                        help="reload the export and compare it with the checkpoint")
    parser.add_argument("--self-forcing", metavar="FILE",
                        help="also write {'generator': original Wan keys} here (and 'generator_ema' if kept)")
    parser.add_argument("--ema", action="store_true",
                        help="export the EMA weights (training.ema_decay) to --output-dir, not the raw ones")
    args = parser.parse_args(argv)
    if os.environ.get("RANK", "0") != "0":  # under torchrun one process does the export
        return
    if args.causal_forcing:
        if args.base is None or args.frames_per_block is None or args.frames_per_block < 1:
            parser.error("--causal-forcing needs --base and --frames-per-block (a positive number)")
        if args.verify or args.self_forcing or args.dtype != "fp32":
            parser.error("--verify, --self-forcing and --dtype apply to --checkpoint, not --causal-forcing")
        convert_causal_forcing(args.causal_forcing, args.base, args.output_dir, args.frames_per_block, args.ema,
                               args.overwrite)
        return
    if args.base is not None or args.frames_per_block is not None:
        parser.error("--base and --frames-per-block apply to --causal-forcing, not --checkpoint")
    export(args.checkpoint, args.output_dir, args.dtype, args.overwrite, args.verify, args.self_forcing,
           args.ema)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
