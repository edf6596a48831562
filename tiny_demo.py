"""The tiny demo: a tiny Wan teacher that has learned something worth distilling, shipped in demo_models/.

    python tiny_demo.py                         # check demo_models/ against its MANIFEST.json
    python tiny_demo.py --rebuild               # retrain the demo models from their seeds (12 min)
    python tiny_demo.py --rebuild --out DIR --steps 4   # a short rebuild elsewhere
    python tiny_demo.py --detect cache/tiny     # what the teacher draws: prompted colour, shape, direction

configs/tiny.yaml uses the shipped models; the scripts' entry points check them against the manifest before use
(build_missing_models), and build the random tiny models of the tests and bench.py (RANDOM_MODELS) on first use.
What the demo is made of:

- A procedural video world: one coloured shape (4 colours x 2 shapes, 3x3 cells of 8 pixels) on a dark 64x64
  frame, 9 frames (3 latent frames), moving 2 cells per latent frame in one of 4 directions; the prompt names
  all three ("a red square moving left"). The pre-training set holds every start cell of every prompt (384
  videos).
- A latent codec packaged as a real diffusers `AutoencoderKLWan` (what WanPipeline and the previews load):
  fixed weights that average each 8x8 pixel block over its 4 frames (the first frame alone, as Wan's causal
  VAE does) and embed its RGB, minus the background, in the 16 latent channels through a fixed orthonormal
  16x3 matrix; the decoder maps back and repeats each cell over its pixels and frames. On this world it is
  exact: decode(encode(v)) equals v. Its `latents_mean`/`latents_std` are the encoded dataset's per-channel
  statistics, used as Wan's are. codec_encode/codec_decode are its closed form (the build and the detection
  rates use them: the VAE itself takes seconds per video on a CPU).
- A seeded flow-matching pre-training (Wan's parameterisation: x_t = (1-s)x0 + s*eps, target v = eps - x0,
  uniform s; every 2nd step one s per latent frame, anchored: see pretraining_sigmas) of a 64-wide teacher
  transformer on the normalised latents, with 10% of prompts replaced by the empty prompt so classifier-free
  guidance has an unconditional model. The student is a copy of the teacher's weights, not a smaller model:
  Self-Forcing's ODE initialisation (CausVid's process) regresses Wan2.1-T2V-1.3B's trajectories into a
  student that starts from that model, and the demo then shows distillation alone, the same network taught
  the teacher's guided 48-step result in a few unguided steps.
- The image-to-video teacher (configs/tiny_i2v.yaml): the teacher grown to Wan2.1-I2V's inputs (36 channels: the
  noisy latent, a mask, the latent of the first frame followed by zero frames; a tiny random CLIP tower's
  tokens), computing at first exactly what the teacher computes, then pre-trained further to continue each
  video given its first frame.

detect(video) reads the colour, shape and direction a decoded video shows; `--detect CACHE` prints how often
the cached teacher samples show the prompted ones (docs/tiny_demo.md has the figures).

All directories share the text encoder, tokenizer, VAE and scheduler (the same seeded build), as the KD
scripts and export.py expect. A rebuild is deterministic given the seed on a given machine and torch version
(it always runs BUILD_THREADS threads): two give byte-identical files.
"""

import argparse
import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time

import torch
from safetensors import safe_open

import atomic_files
import errors
from errors import ConfigError
from flow_matching import NUM_TRAIN_TIMESTEPS, add_noise
from teacher import encode_prompt, pad_embeds

COLOURS = {  # RGB in the VAE's pixel range [-1, 1]
    "red": (0.9, -0.8, -0.8),
    "green": (-0.8, 0.8, -0.8),
    "blue": (-0.8, -0.5, 0.9),
    "yellow": (0.9, 0.8, -0.8),
}
SHAPES = {  # 3x3 latent cells
    "square": ((1, 1, 1), (1, 1, 1), (1, 1, 1)),
    "cross": ((0, 1, 0), (1, 1, 1), (0, 1, 0)),
}
# (row, column) per latent frame
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
BACKGROUND = -0.8  # dark grey, every channel
FOREGROUND = 0.85  # detect: a cell is foreground when a channel is this far from the background
MAX_MISMATCH = 2  # detect: cells (of 64) a frame's best shape placement may miss for the frame to show it
MIN_TRAVEL = 1.0  # detect: cells the shape must move from the first latent frame to the last (the world: 4)
# configs/tiny.yaml's video; the Wan VAE's 8x spatial, 4x time
NUM_FRAMES, SIZE, CELL, TIME_FACTOR = 9, 64, 8, 4
LATENT_FRAMES, GRID = (NUM_FRAMES - 1) // TIME_FACTOR + 1, SIZE // CELL  # 3, 8
SHAPE_CELLS = 3
# latent cells the shape moves per latent frame (16 pixels per 4 video frames): one 2x2 patch of the teacher's
# tokens, so that a frame's shape is the previous frame's tokens moved by one token
SPEED = 2
VIDEOS_PER_PROMPT = 12  # start cells per prompt in the pre-training set: all 12 that keep the shape inside

TEXT_SEED = 3  # text encoder and the codec's embedding: shared by teacher and student
DEMO_MODELS = {  # transformer size and pre-training of each demo model, or the model whose weights it copies
    # width 64: a 2x2 patch of 16 latent channels is 64 numbers, and a narrower stream cannot carry the noise
    "wan-tiny-demo-teacher": dict(layers=4, heads=4, head_dim=16, ffn_dim=128, seed=11, steps=10000),
    "wan-tiny-demo-student": dict(copy_of="wan-tiny-demo-teacher"),
    # Wan2.1-I2V's layout (36 input channels, CLIP tokens: image_to_video_transformer) grown from the teacher, then
    # pre-trained further to continue each video's first frame given as the image
    "wan-tiny-demo-i2v-teacher": dict(image_of="wan-tiny-demo-teacher", seed=12, steps=1500),
}
# fraction of training prompts replaced by the empty prompt (the unconditional model of CFG)
CFG_DROPOUT = 0.1
# every 2nd pre-training step noises each latent frame at its own sigma, one frame less noisy than the others:
# frames then have to be predicted from each other (pretraining_sigmas), as the block-causal demo student runs
FRAME_NOISE_EVERY = 2
DEMO_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_models")  # shipped, committed
MANIFEST = "MANIFEST.json"  # in DEMO_FOLDER: each shipped file's sha256 and the recipe that built them
BUILD_THREADS = 1  # torch threads of the build, whatever the caller's: the same weights on every start
# configs/tiny.yaml's method.teacher_negative_prompt: what the unconditional model was taught
NEGATIVE_PROMPT = ""
BATCH_SIZE, LR = 16, 3e-3
MAX_SEQUENCE_LENGTH = 16  # configs/tiny.yaml's pipeline.max_sequence_length: the prompts are 6 tokens
# configs/tiny_i2v.yaml's: diffusers' Wan attention takes the first (length - 512) context tokens as the image's
I2V_SEQUENCE_LENGTH = 512
CLIP_DIM, CLIP_SIZE = 32, 32  # the demo I2V teacher's tiny CLIP vision tower: width, input pixels (patches of 8)
FLOW_SHIFT = 5.0


# ----------------------------------------------------------------------------------------------------------
# Random tiny models (tests, faults.py, bench.py) and building any tiny model on first use

RANDOM_MODELS = {  # offline random Wan pipelines, built on first use at any path ending in these names
    "wan-tiny-teacher": dict(layers=4, heads=2, head_dim=16, ffn_dim=64, seed=1),
    "wan-tiny-student": dict(layers=2, heads=2, head_dim=12, ffn_dim=48, seed=2),
    "wan-bench-small": dict(layers=2, heads=4, head_dim=64, ffn_dim=1024, seed=3),  # bench.py: compute-bound
}
TWO_EXPERT_MODELS = {  # offline random two-expert pipelines (Wan2.2 A14B's layout), built like RANDOM_MODELS
    "wan-tiny-moe-teacher": dict(layers=4, heads=2, head_dim=16, ffn_dim=64, seed=4, seed_2=5,
                                 boundary_ratio=0.875),
}
I2V_MODELS = {  # offline random image-to-video pipelines (Wan2.1-I2V's layout: 36 input channels, CLIP tokens)
    "wan-tiny-i2v-teacher": dict(layers=4, heads=2, head_dim=16, ffn_dim=64, seed=6),
    # Wan2.2-I2V-A14B's layout: two experts (transformer_2 from seed_2, boundary 0.9), 36 channels, no CLIP
    "wan-tiny-i2v-moe-teacher": dict(layers=4, heads=2, head_dim=16, ffn_dim=64, seed=7, clip=False, seed_2=8,
                                     boundary_ratio=0.9),
}
# image-to-video: the shipped demo teacher marked expand_timesteps (Wan2.2-TI2V's conditioning). Its pre-training's
# anchored frames (pretraining_sigmas) taught it to read a less noisy frame: it continues a given first frame as is.
DEMO_TI2V_TEACHER = "wan-tiny-demo-ti2v-teacher"
RANDOM_TINY_SETTINGS = [  # overrides for the random models (configs/tiny.yaml is tuned for the demo models)
    "pipeline.max_sequence_length=512", "training.lr=1e-3", "method.t_list=[999, 937, 833, 624, 0]",
    "pipeline.num_frames=21",  # 6 latent frames: room for causal blocks and a partial last one
]
REPO = os.path.dirname(os.path.abspath(__file__))
TEXT_DIM = 32  # d_model of the tiny UMT5 (must be shared by tiny teacher and student)
RANDOM_CORPUS = (  # the tiny byte-level BPE tokenizer is trained on these words; any text still tokenizes
    "a cat walks along the beach at sunset while waves roll in slowly. a drone flies over snowy mountains "
    "and a quiet river in the forest. a red car drives through a rainy city street at night with neon "
    "lights. two dogs play with a ball in a green park; children laugh. close-up of coffee poured into a "
    "white cup."
)


def tiny_tokenizer(corpus=RANDOM_CORPUS):
    """A byte-level BPE tokenizer trained on `corpus` (any text still tokenizes), with UMT5's special tokens.
    """
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


def tiny_text_encoder(vocab_size):
    """A random 2-layer UMT5 encoder of width TEXT_DIM (drawn from the global RNG)."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    )


def make_random_wan(path, layers, heads, head_dim, ffn_dim, seed):
    """Write a complete random Wan diffusers directory (transformer, UMT5, tokenizer, VAE, scheduler)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = tiny_text_encoder(len(tokenizer))
    transformer = WanTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=ffn_dim, num_layers=layers, rope_max_seq_len=64,
    )
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=5.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(path)


def make_random_two_expert_wan(path, boundary_ratio, seed_2, **first):
    """make_random_wan's directory plus a second random transformer of the same size (transformer_2, the
    low-noise expert, drawn from `seed_2`) and `boundary_ratio`, saved by WanPipeline into model_index.json as
    diffusers saves Wan2.2-T2V-A14B."""
    from diffusers import WanPipeline, WanTransformer3DModel

    make_random_wan(path, **first)
    components = WanPipeline.from_pretrained(path).components
    torch.manual_seed(seed_2)
    components["transformer_2"] = WanTransformer3DModel.from_config(components["transformer"].config)
    WanPipeline(**components, boundary_ratio=boundary_ratio).save_pretrained(path)


def make_random_i2v_wan(path, layers, heads, head_dim, ffn_dim, seed, clip=True, seed_2=None, boundary_ratio=None):
    """A random image-to-video Wan directory as diffusers saves Wan2.1-I2V-14B (a transformer taking 36 channels:
    the noisy latent, a 4-channel mask, the image's latent; CLIP image tokens from a tiny CLIPVisionModel and its
    CLIPImageProcessor) or, with seed_2 and boundary_ratio and no clip, Wan2.2-I2V-A14B (two such experts, no
    CLIP); make_random_wan's UMT5, tokenizer, VAE and scheduler."""
    from diffusers import WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    make_random_wan(path, layers, heads, head_dim, ffn_dim, seed)
    components = WanPipeline.from_pretrained(path).components
    torch.manual_seed(seed + 100)
    image = dict(image_dim=32, added_kv_proj_dim=heads * head_dim) if clip else {}

    def transformer():
        return WanTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=36,
                                     out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=ffn_dim,
                                     num_layers=layers, rope_max_seq_len=64, **image)

    components["transformer"] = transformer()
    if clip:
        components["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
            patch_size=8))
        components["image_processor"] = CLIPImageProcessor(size={"shortest_edge": 32},
                                                           crop_size={"height": 32, "width": 32})
    if seed_2 is not None:
        torch.manual_seed(seed_2)
        components["transformer_2"] = transformer()
    shutil.rmtree(path)
    WanImageToVideoPipeline(**components, boundary_ratio=boundary_ratio).save_pretrained(path)


def make_demo_ti2v_teacher(path):
    """DEMO_TI2V_TEACHER: a copy of the shipped demo teacher whose model_index.json sets expand_timesteps."""
    ensure_model_dir(os.path.join(DEMO_FOLDER, "wan-tiny-demo-teacher"))
    shutil.copytree(os.path.join(DEMO_FOLDER, "wan-tiny-demo-teacher"), path)
    index = os.path.join(path, "model_index.json")
    with open(index) as f:
        config = json.load(f)
    with open(index, "w") as f:
        json.dump({**config, "expand_timesteps": True}, f, indent=2)


def random_tiny_overrides(cache_dir):
    """configs/tiny.yaml overrides for the random tiny teacher and student (absolute paths), the example
    prompts and the cache `cache_dir`: the setting of the tests and faults.py."""
    return [f"models.student.init_from={REPO}/tiny_models/wan-tiny-student",
            f"models.teacher.init_from={REPO}/tiny_models/wan-tiny-teacher",
            f"data.prompts={REPO}/prompts/example.txt", f"method.teacher_path_cache={cache_dir}",
            *RANDOM_TINY_SETTINGS]


def build_missing_models(cfg):
    """Build each random tiny model that cfg names and that does not exist yet, and check the shipped demo
    models it names against their manifest: the one place the scripts do either.

    Call it before torch.distributed is initialised (transformers' save_pretrained writes only on rank 0 of a
    process group); ranks and concurrent runs wait for one builder on a file lock.
    """
    for section in (cfg.models.student, cfg.models.teacher):
        if section is not None:
            ensure_model_dir(section.init_from)


def ensure_model_dir(init_from):
    """`init_from` itself; a missing path named after a random tiny model is built first, atomically, by one
    process; a path named after a demo model must be the shipped (or rebuilt) one, whole (ConfigError)."""
    name = os.path.basename(os.path.normpath(init_from))
    folder = os.path.dirname(os.path.normpath(init_from)) or "."
    if name in DEMO_MODELS:
        problem = demo_models_problem(folder, (name,))
        if problem:
            raise ConfigError(f"{init_from}: {problem}; restore it with `git checkout -- {folder}` or rebuild "
                              f"it with `python tiny_demo.py --rebuild --out {folder}`")
        return init_from
    if name not in {**RANDOM_MODELS, **TWO_EXPERT_MODELS, **I2V_MODELS, DEMO_TI2V_TEACHER: None} or (
            os.path.exists(init_from)):
        return init_from
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks and concurrent runs wait for one builder
        if not os.path.exists(init_from):
            tmp = os.path.join(folder, f"{name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            if name in TWO_EXPERT_MODELS:
                make_random_two_expert_wan(tmp, **TWO_EXPERT_MODELS[name])
            elif name in I2V_MODELS:
                make_random_i2v_wan(tmp, **I2V_MODELS[name])
            elif name == DEMO_TI2V_TEACHER:
                make_demo_ti2v_teacher(tmp)
            else:
                make_random_wan(tmp, **RANDOM_MODELS[name])
            os.rename(tmp, init_from)
    return init_from


# ----------------------------------------------------------------------------------------------------------
# The shipped demo models: their manifest and its check


def file_digests(folder, names):
    """{path relative to folder: sha256 hex} of every file under folder/name for each name."""
    digests = {}
    for name in names:
        for root, _, files in os.walk(os.path.join(folder, name)):
            for f in files:
                path = os.path.join(root, f)
                with open(path, "rb") as fh:
                    digests[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return dict(sorted(digests.items()))


def demo_models_problem(folder, names=tuple(DEMO_MODELS)):
    """None when folder/MANIFEST (written by --rebuild) lists exactly the files of the named demo models with
    their sha256; else what is wrong, in a few words."""
    manifest_path = os.path.join(folder, MANIFEST)
    missing = [n for n in names if not os.path.isdir(os.path.join(folder, n))]
    if missing:
        return f"the demo model {missing[0]} is missing"
    try:
        with open(manifest_path) as f:
            listed = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{manifest_path} is missing or unreadable ({errors.one_line(e)})"
    wanted = {k: v for k, v in listed.items() if k.split(os.sep)[0] in names}
    found = file_digests(folder, names)
    for path in sorted(set(wanted) | set(found)):
        if path not in found:
            return f"{os.path.join(folder, path)} is missing"
        if path not in wanted:
            return f"{os.path.join(folder, path)} is not in {manifest_path}"
        if found[path] != wanted[path]:
            return f"{os.path.join(folder, path)} differs from its sha256 in {manifest_path}"
    return None


def rebuild(folder, steps=None, log=None):
    """Pre-train the demo models from their seeds into folder (replacing what is there) and write its
    MANIFEST last: a rebuild killed part way leaves a folder that fails the check, never a mixed one."""
    log = log or log_line
    os.makedirs(folder, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, MANIFEST))
    tmp = {n: os.path.join(folder, f"{n}.tmp{os.getpid()}") for n in DEMO_MODELS}
    for path in tmp.values():
        shutil.rmtree(path, ignore_errors=True)
    recipe = build(tmp, log, steps)
    for name, path in tmp.items():
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        os.rename(path, os.path.join(folder, name))
    atomic_files.write_json_atomic(os.path.join(folder, MANIFEST),
                                   {"recipe": recipe, "files": file_digests(folder, DEMO_MODELS)})


# ----------------------------------------------------------------------------------------------------------
# The world


def demo_prompts():
    """Every (colour, shape, direction) prompt, in a fixed order: 'a red square moving left', ..."""
    return [f"a {c} {s} moving {d}" for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def parse_prompt(prompt):
    """(colour, shape, direction) named by a demo prompt."""
    _, colour, shape, _, direction = prompt.split()
    return colour, shape, direction


def shape_cells(direction, start):
    """Top-left latent cell (row, column) of the shape in each latent frame: SPEED cells further each."""
    dr, dc = DIRECTIONS[direction]
    return [(start[0] + dr * SPEED * k, start[1] + dc * SPEED * k) for k in range(LATENT_FRAMES)]


def start_cells(direction):
    """Every top-left start cell from which the shape stays inside the frame while it moves."""
    dr, dc = DIRECTIONS[direction]
    travel = SPEED * (LATENT_FRAMES - 1)
    last = GRID - SHAPE_CELLS
    rows = range(max(0, -dr * travel), last + 1 - max(0, dr * travel))
    cols = range(max(0, -dc * travel), last + 1 - max(0, dc * travel))
    return [(r, c) for r in rows for c in cols]


def shape_video(prompt, start):
    """[3, F, H, W] in [-1, 1]: the prompt's shape moving from latent cell `start` (row, column).

    Pixel frame 0 is latent frame 0, frames 4k-3..4k are latent frame k (Wan's causal time compression).
    """
    colour, shape, direction = parse_prompt(prompt)
    cells = torch.zeros(LATENT_FRAMES, GRID, GRID)
    mask = torch.tensor(SHAPES[shape], dtype=torch.float32)
    for k, (r, c) in enumerate(shape_cells(direction, start)):
        cells[k, r : r + SHAPE_CELLS, c : c + SHAPE_CELLS] = mask
    frames = torch.cat([cells[:1], cells[1:].repeat_interleave(TIME_FACTOR, 0)])  # [F, GRID, GRID]
    pixels = frames.repeat_interleave(CELL, 1).repeat_interleave(CELL, 2)  # [F, H, W]
    rgb = torch.tensor(COLOURS[colour])[:, None, None, None]
    return BACKGROUND + pixels[None] * (rgb - BACKGROUND)


def demo_videos(per_prompt=VIDEOS_PER_PROMPT, seed=0):
    """(videos [N, 3, F, H, W], prompts [N]): each prompt from `per_prompt` start cells drawn without
    replacement."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for prompt in demo_prompts():
        starts = start_cells(parse_prompt(prompt)[2])
        pairs += [(prompt, starts[i]) for i in torch.randperm(len(starts), generator=g)[:per_prompt].tolist()]
    return torch.stack([shape_video(p, s) for p, s in pairs]), [p for p, _ in pairs]


@functools.cache
def placements():
    """[len(SHAPES), P, GRID, GRID] bool: each shape at each of its P top-left cells inside the frame."""
    last = GRID - SHAPE_CELLS
    masks = torch.zeros(len(SHAPES), last + 1, last + 1, GRID, GRID, dtype=torch.bool)
    for s, pattern in enumerate(SHAPES.values()):
        pattern = torch.tensor(pattern, dtype=torch.bool)
        for r in range(last + 1):
            for c in range(last + 1):
                masks[s, r, c, r : r + SHAPE_CELLS, c : c + SHAPE_CELLS] = pattern
    return masks.flatten(1, 2)


def centroid(mask):
    """(row, column) [2] of the mean of a mask's cells [GRID, GRID]."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return torch.stack([rows.float().mean(), cols.float().mean()])


def detect(video):
    """(colour, shape, direction) seen in a decoded video [3, F, H, W] in [-1, 1]; None for each that does
    not show.

    Read per latent cell (the codec draws whole 8x8x4 blocks): a cell is foreground when a channel differs
    from the background by more than FOREGROUND. Colour: the palette entry nearest the mean foreground cell.
    Shape: each latent frame votes for the shape whose best placement misses fewer cells (foreground outside
    it counts as a miss too), if it misses at most MAX_MISMATCH; the majority of the votes. Direction: the
    larger component of the foreground centroid's displacement from the first latent frame to the last, if it
    is at least MIN_TRAVEL cells.
    """
    frames = video[:, [0, *range(TIME_FACTOR, video.shape[1], TIME_FACTOR)]]  # [3, LATENT_FRAMES, H, W]
    cells = frames.unflatten(2, (GRID, CELL)).unflatten(4, (GRID, CELL)).mean(dim=(3, 5))  # [3, F', G, G]
    foreground = (cells - BACKGROUND).abs().amax(0) > FOREGROUND  # [F', GRID, GRID]
    if not foreground.any():
        return None, None, None
    mean = cells.permute(1, 2, 3, 0)[foreground].mean(0)  # [3]
    colour = min(COLOURS, key=lambda c: float((torch.tensor(COLOURS[c]) - mean).pow(2).sum()))
    misses = (foreground[:, None, None] != placements()[None]).sum(dim=(3, 4)).amin(2)  # [F', len(SHAPES)]
    votes = [list(SHAPES)[int(m.argmin())] for m in misses if m.min() <= MAX_MISMATCH and m.min() < m.max()]
    first, second = sorted(SHAPES, key=votes.count, reverse=True)
    shape = first if votes.count(first) > votes.count(second) else None  # no votes or a tie: none reads
    direction = None
    if foreground[0].any() and foreground[-1].any():
        dr, dc = (centroid(foreground[-1]) - centroid(foreground[0])).tolist()
        if max(abs(dr), abs(dc)) >= MIN_TRAVEL:
            direction = ("down" if dr > 0 else "up") if abs(dr) > abs(dc) else ("right" if dc > 0 else "left")
    return colour, shape, direction


def detection_rates(cache_dir, vae_config):
    """({colour, shape, direction: fraction of cached samples whose teacher x0 shows the prompt's}, count).

    The x0 are decoded by codec_decode, the codec VAE's exact closed form (the VAE itself takes seconds per
    video on a CPU)."""
    names = sorted(n for n in os.listdir(os.path.join(cache_dir, "samples")) if n.endswith(".safetensors"))
    hits = dict.fromkeys(("colour", "shape", "direction"), 0)
    for name in names:
        with safe_open(os.path.join(cache_dir, "samples", name), framework="pt") as f:
            x0, prompt = f.get_slice("latents")[-1].float(), f.metadata()["prompt"]  # [C, F, H, W]
        for key, wanted, seen in zip(hits, parse_prompt(prompt), detect(codec_decode(x0, vae_config))):
            hits[key] += wanted == seen
    return {key: n / len(names) for key, n in hits.items()}, len(names)


# ----------------------------------------------------------------------------------------------------------
# The codec: fixed weights of a small AutoencoderKLWan

_OFFSET = 16.0  # added before the output SiLU, where SiLU(x + 16) = x + 16 to 1e-5 over the signal's range
_CONSTANT = 1e4  # a constant channel before each output RMS norm, so it divides by this to 1e-5 relative


def latent_embedding():
    """[16, 3]: orthonormal columns, the fixed map from a cell's RGB (minus background) to its latent
    channels."""
    g = torch.Generator().manual_seed(TEXT_SEED)
    q, _ = torch.linalg.qr(torch.randn(16, 3, generator=g, dtype=torch.float64))
    return q.float()


def codec_vae(latents_mean=None, latents_std=None):
    """AutoencoderKLWan whose encoder averages 8x8x4 blocks into E @ (rgb - background) and whose decoder
    inverts it.

    Every residual and attention branch is zero (identity blocks); the only nonlinear step, RMS norm + SiLU
    before each conv_out, is made linear by a large constant channel and an offset (see _CONSTANT, _OFFSET).
    """
    from diffusers import AutoencoderKLWan

    extra = {} if latents_mean is None else dict(latents_mean=latents_mean, latents_std=latents_std)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, **extra)
    embed = latent_embedding()  # [16, 3]
    rgb = range(3)
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        enc, dec = vae.encoder, vae.decoder
        for c in rgb:  # causal 3x3x3 convs: the current frame is time tap 2, the centre pixel is (1, 1)
            enc.conv_in.weight[c, c, 2, 1, 1] = 1
        enc.conv_in.bias[:3] = -BACKGROUND
        for layer in enc.down_blocks:
            if hasattr(layer, "resample") and not isinstance(layer.resample, torch.nn.Identity):
                for c in rgb:  # zero-pad right/bottom, 3x3 stride 2: taps (0..1, 0..1) are one 2x2 block
                    layer.resample[1].weight[c, c, :2, :2] = 0.25
                    if hasattr(layer, "time_conv"):  # (previous, a, b) with stride 2: the mean of a and b
                        layer.time_conv.weight[c, c, 1:, 0, 0] = 0.5
        _linear_head(enc.mid_block.resnets[-1], enc.norm_out)
        for c in rgb:
            enc.conv_out.weight[:16, c, 2, 1, 1] = embed[:, c]
        enc.conv_out.bias[:16] = -_OFFSET * embed.sum(1)
        enc.conv_out.bias[16:] = -30.0  # log-variance at its clamp: the posterior is its mean
        for c in range(32):
            vae.quant_conv.weight[c, c, 0, 0, 0] = 1
        for c in range(16):
            vae.post_quant_conv.weight[c, c, 0, 0, 0] = 1
        dec.conv_in.weight[:3, :, 2, 1, 1] = embed.T
        for block in dec.up_blocks:
            for resnet in block.resnets:
                if isinstance(resnet.conv_shortcut, torch.nn.Conv3d):
                    for c in rgb:
                        resnet.conv_shortcut.weight[c, c, 0, 0, 0] = 1
            for up in block.upsamplers or []:
                # nearest-neighbour 2x, then the centre tap; time: both frames copy the current one
                for c in rgb:
                    up.resample[1].weight[c, c, 1, 1] = 1
                    if hasattr(up, "time_conv"):
                        up.time_conv.weight[c, c, 2, 0, 0] = 1
                        up.time_conv.weight[up.dim + c, c, 2, 0, 0] = 1
        _linear_head(dec.up_blocks[-1].resnets[-1], dec.norm_out)
        for c in rgb:
            dec.conv_out.weight[c, c, 2, 1, 1] = 1
        dec.conv_out.bias[:] = BACKGROUND - _OFFSET
    return vae


def codec_decode(latents, vae_config):
    """Video [3, F, H, W] of normalised latents [16, F', 8, 8]: what codec_vae's decoder computes, in closed
    form (un-normalise with the config's latents_mean/std, map back through the embedding, repeat each cell).
    """
    mean = torch.tensor(vae_config["latents_mean"]).view(-1, 1, 1, 1)
    std = torch.tensor(vae_config["latents_std"]).view(-1, 1, 1, 1)
    latents = latents * std + mean  # [16, F', 8, 8]
    cells = torch.einsum("cd,cfhw->dfhw", latent_embedding(), latents) + BACKGROUND  # [3, F', 8, 8]
    frames = torch.cat([cells[:, :1], cells[:, 1:].repeat_interleave(TIME_FACTOR, 1)], dim=1)
    return frames.repeat_interleave(CELL, 2).repeat_interleave(CELL, 3).clamp(-1, 1)


def _linear_head(last_resnet, norm_out):
    """Bias the last residual block so norm_out + SiLU pass channels 0-2 through plus _OFFSET (undone by
    conv_out)."""
    dim = norm_out.gamma.shape[0]
    last_resnet.conv2.bias[:3] = _OFFSET
    last_resnet.conv2.bias[dim - 1] = _CONSTANT
    norm_out.gamma[:3] = _CONSTANT / dim**0.5  # RMS norm divides by |x| / sqrt(dim) = _CONSTANT / sqrt(dim)


@torch.no_grad()
def encode(vae, videos):
    """Latents [N, 16, 6, 8, 8] of videos [N, 3, F, H, W] (the posterior mean), before Wan's normalisation."""
    return torch.cat([vae.encode(batch).latent_dist.mode() for batch in videos.split(32)])


def latent_stats(vae):
    """(latents_mean, 1 / latents_std), each [1, 16, 1, 1, 1], as WanPipeline reads them."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    return mean, 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)


def codec_encode(videos):
    """Latents [N, 16, 6, 8, 8] of videos [N, 3, F, H, W]: what codec_vae's encoder computes (before Wan's
    normalisation), in closed form: each 8x8-pixel block's mean over its frames, minus the background,
    embedded."""
    frames = torch.cat([videos[:, :, :1], videos[:, :, 1:].unflatten(2, (-1, TIME_FACTOR)).mean(3)], dim=2)
    cells = frames.unflatten(3, (GRID, CELL)).unflatten(5, (GRID, CELL)).mean(dim=(4, 6))  # [N, 3, 6, 8, 8]
    return torch.einsum("cd,ndfhw->ncfhw", latent_embedding(), cells - BACKGROUND)


def fitted_codec(videos):
    """(codec_vae with latents_mean/std fitted to the encoded `videos`, their normalised latents [N, 16, 6, 8,
    8]). The latents come from codec_encode, the encoder's closed form (the VAE takes seconds per video)."""
    latents = codec_encode(videos)
    mean = [round(float(m), 6) for m in latents.mean(dim=(0, 2, 3, 4))]
    std = [round(float(s), 6) for s in latents.std(dim=(0, 2, 3, 4))]
    vae = codec_vae(mean, std)
    mean_, inv_std = latent_stats(vae)
    return vae, (latents - mean_) * inv_std


# ----------------------------------------------------------------------------------------------------------
# Pre-training


def prompt_embeddings(encoder, tokenizer, prompts, n=MAX_SEQUENCE_LENGTH):
    """{prompt: [n, D]} as the KD scripts condition the teacher (real tokens, then zero rows)."""
    return {p: pad_embeds(encode_prompt(encoder, tokenizer, p, n, torch.device("cpu")), n) for p in prompts}


def pretraining_sigmas(generator, step, batch, frames):
    """[batch] uniform noise levels, one per video; on every FRAME_NOISE_EVERY-th step [batch, frames], one per
    latent frame: one frame of each video (the anchor) at a uniform level, the others uniform above it.

    The anchored steps teach what the uniform ones barely reward: where the prompted motion puts a frame's
    shape, read from a less noisy frame (docs/tiny_demo.md). A timestep per token makes diffusers' Wan slower,
    hence whole steps rather than a share of each batch.
    """
    if (step + 1) % FRAME_NOISE_EVERY:
        return torch.rand(batch, generator=generator)
    anchor = torch.rand(batch, 1, generator=generator)  # [B, 1]
    sigma = anchor + (1 - anchor) * torch.rand(batch, frames, generator=generator)  # [B, F]
    sigma[torch.arange(batch), torch.randint(frames, (batch,), generator=generator)] = anchor[:, 0]
    return sigma


def pretrain(transformer, latents, embeds, steps, seed, log=None, image=None):
    """Flow-matching pre-training on (latents [N, C, F, H, W], per-sample prompt embeddings [N, L, D]); with
    `image` (condition channels [N, 20, F, H, W], CLIP tokens [N, T, D]) as Wan2.1-I2V is conditioned on it,
    the same image given to the unconditional model."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 *
                                                 (1 + torch.cos(torch.tensor(s / steps * torch.pi)).item()))
    empty = embeds["uncond"]
    _, p_h, p_w = transformer.config.patch_size
    tokens_per_frame = latents.shape[3] // p_h * (latents.shape[4] // p_w)
    transformer.train()
    for step in range(steps):
        idx = torch.randint(len(latents), (BATCH_SIZE,), generator=g)
        x0 = latents[idx]  # [B, C, F, H, W]
        context = embeds["cond"][idx].clone()  # [B, L, D]
        drop = torch.rand(BATCH_SIZE, generator=g) < CFG_DROPOUT
        context[drop] = empty
        sigma = pretraining_sigmas(g, step, BATCH_SIZE, x0.shape[2])  # [B] or [B, F]
        eps = torch.randn(x0.shape, generator=g)
        per_frame = sigma.ndim == 2
        x_t = add_noise(x0, eps, sigma[:, None, :, None, None] if per_frame else sigma.view(-1, 1, 1, 1, 1))
        timestep = sigma * NUM_TRAIN_TIMESTEPS
        if per_frame:  # diffusers' Wan takes a timestep per token: [B, F * tokens per frame]
            timestep = timestep.repeat_interleave(tokens_per_frame, dim=1)
        if image is None:
            v = transformer(x_t, timestep, context, return_dict=False)[0]
        else:
            v = transformer(torch.cat([x_t, image[0][idx]], dim=1), timestep, context,
                            encoder_hidden_states_image=image[1][idx], return_dict=False)[0]
        loss = (v - (eps - x0)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if log is not None and (step + 1) % 500 == 0:
            log(f"  step {step + 1}/{steps}: flow-matching loss {loss.item():.4f}")
    return transformer.eval()


def log_line(text):
    print(text, file=sys.stderr, flush=True)  # stderr: the scripts' stdout is their own report


def build(paths, log=log_line, steps=None):
    """Write each demo model {name: path} (DEMO_MODELS names) as a complete Wan diffusers directory.

    steps: pre-training steps instead of DEMO_MODELS' (the determinism test builds with a few)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)  # the same floats whatever the caller's threads
    try:
        return _build(paths, log, steps)
    finally:
        torch.set_num_threads(threads)


def _build(paths, log, steps):
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel

    start = time.perf_counter()
    torch.manual_seed(TEXT_SEED)
    tokenizer = tiny_tokenizer(" ".join(demo_prompts()))  # one token per word of the demo's prompts
    text_encoder = tiny_text_encoder(len(tokenizer)).eval()
    videos, prompts = demo_videos()
    vae, latents = fitted_codec(videos)

    def prompt_table(n):
        table = prompt_embeddings(text_encoder, tokenizer, demo_prompts() + [NEGATIVE_PROMPT], n)
        return {"cond": torch.stack([table[p] for p in prompts]), "uncond": table[NEGATIVE_PROMPT]}

    embeds = prompt_table(MAX_SEQUENCE_LENGTH)
    log(f"tiny demo: {len(videos)} videos of moving shapes encoded for the codec VAE in "
        f"{time.perf_counter() - start:.0f} s")
    trained, clips = {}, {}

    def transformer_of(name):
        spec = DEMO_MODELS[name]
        if "copy_of" in spec:
            return transformer_of(spec["copy_of"])
        if name in trained:
            return trained[name]
        n = spec["steps"] if steps is None else steps
        if "image_of" in spec:
            base = transformer_of(spec["image_of"])
            torch.manual_seed(spec["seed"])
            clips[name] = tiny_clip()
            trained[name] = image_to_video_transformer(base)
            image = (image_condition(videos, vae), clip_tokens(*clips[name], videos))
            log(f"pre-training {name} from {spec['image_of']} ({n} steps of {BATCH_SIZE} videos, each given its "
                "first frame)")
            pretrain(trained[name], latents, prompt_table(I2V_SEQUENCE_LENGTH), n, spec["seed"], log, image)
            return trained[name]
        torch.manual_seed(spec["seed"])
        trained[name] = WanTransformer3DModel(
            num_attention_heads=spec["heads"], attention_head_dim=spec["head_dim"], in_channels=16,
            out_channels=16, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=spec["ffn_dim"],
            num_layers=spec["layers"], rope_max_seq_len=64,
        )
        log(f"pre-training {name} ({sum(p.numel() for p in trained[name].parameters())} parameters, "
            f"{n} steps of {BATCH_SIZE} videos)")
        pretrain(trained[name], latents, embeds, n, spec["seed"], log)
        return trained[name]

    for name, path in paths.items():
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=FLOW_SHIFT)
        components = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                          transformer=transformer_of(name))
        if name in clips:
            image_encoder, image_processor = clips[name]
            WanImageToVideoPipeline(**components, image_encoder=image_encoder,
                                    image_processor=image_processor).save_pretrained(path)
        else:
            WanPipeline(**components).save_pretrained(path)
        log(f"{name} written to {path} ({time.perf_counter() - start:.0f} s since the start)")
    teacher_steps = DEMO_MODELS["wan-tiny-demo-teacher"]["steps"] if steps is None else steps
    return {"models": DEMO_MODELS, "steps": teacher_steps, "batch_size": BATCH_SIZE, "lr": LR,
            "cfg_dropout": CFG_DROPOUT, "frame_noise_every": FRAME_NOISE_EVERY, "threads": BUILD_THREADS,
            "torch": torch.__version__, "seconds": round(time.perf_counter() - start)}


def tiny_clip():
    """(a random tiny CLIPVisionModel, its CLIPImageProcessor): the demo I2V teacher's image tokens, as Wan2.1-I2V
    takes CLIP ViT-H's (17 tokens of width CLIP_DIM from a CLIP_SIZE-pixel centre crop)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=CLIP_DIM, intermediate_size=2 * CLIP_DIM,
                                             num_hidden_layers=3, num_attention_heads=2, image_size=CLIP_SIZE,
                                             patch_size=8)).eval()
    size = {"height": CLIP_SIZE, "width": CLIP_SIZE}
    return model, CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE}, crop_size=size)


def image_to_video_transformer(base):
    """A Wan2.1-I2V-shaped copy of the text-to-video `base` (36 input channels, an image embedder and image keys
    and values in every cross-attention) that computes exactly what base computes: the 20 condition channels'
    patch weights and the image values start at zero (the rest new, drawn from the global seed)."""
    from diffusers import WanTransformer3DModel

    c = base.config
    model = WanTransformer3DModel(
        num_attention_heads=c.num_attention_heads, attention_head_dim=c.attention_head_dim,
        in_channels=c.in_channels + 4 + c.out_channels, out_channels=c.out_channels, text_dim=c.text_dim,
        freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers, rope_max_seq_len=c.rope_max_seq_len,
        image_dim=CLIP_DIM, added_kv_proj_dim=c.num_attention_heads * c.attention_head_dim)
    state = dict(base.state_dict())
    patch = state["patch_embedding.weight"]  # [D, 16, 1, 2, 2]
    grown = patch.new_zeros(patch.shape[0], model.config.in_channels - patch.shape[1], *patch.shape[2:])
    state["patch_embedding.weight"] = torch.cat([patch, grown], dim=1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("image_embedder" in k or "add" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        for block in model.blocks:
            block.attn2.add_v_proj.weight.zero_()
            block.attn2.add_v_proj.bias.zero_()
    return model


def first_frames(videos):
    """[N, 3, H, W] in [-1, 1]: each video's first frame as its PNG stores it (the image a prompts file names)."""
    return torch.stack([torch.from_numpy(to_png_pixels(v[:, 0])).permute(2, 0, 1) for v in videos]) / 127.5 - 1


def image_condition(videos, vae):
    """[N, 20, F, H, W]: Wan2.1-I2V's condition channels of each video's first frame: the mask (1 on the first
    latent frame), then the normalised latent of that frame followed by zero frames, as i2v.image_conditioner
    encodes it (here in the codec's closed form)."""
    n, _, frames = videos.shape[:3]
    image = first_frames(videos)[:, :, None]  # [N, 3, 1, H, W]
    video = torch.cat([image, image.new_zeros(n, 3, frames - 1, *image.shape[3:])], dim=2)
    mean, inv_std = latent_stats(vae)
    latent = (codec_encode(video) - mean) * inv_std  # [N, 16, F, h, w]
    mask = torch.zeros_like(latent[:, :1]).repeat(1, TIME_FACTOR, 1, 1, 1)
    mask[:, :, 0] = 1
    return torch.cat([mask, latent], dim=1)


@torch.no_grad()
def clip_tokens(model, processor, videos):
    """[N, 17, CLIP_DIM]: each first frame's CLIP tokens as WanImageToVideoPipeline.encode_image computes them."""
    from PIL import Image

    images = [Image.fromarray(to_png_pixels(v[:, 0])) for v in videos]
    inputs = processor(images=images, return_tensors="pt")
    return model(**inputs, output_hidden_states=True).hidden_states[-2]


class GaussianVelocity(torch.nn.Module):
    """An oracle teacher for tests and bench.py: the exact flow-matching velocity E[eps - x0 | x_t] for data
    x0 ~ N(mu, s^2 I), with Wan's forward signature.

    mu is read from the conditioning (its mean), so conditional and unconditional inputs give different data.
    """

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=True):
        sigma = (timestep.double() / 1000).view(-1, *[1] * (hidden_states.dim() - 1))
        mu = encoder_hidden_states.double().mean(dim=(1, 2)).view_as(sigma)
        x = hidden_states.double()
        var = (1 - sigma) ** 2 * self.s**2 + sigma**2
        z = x - (1 - sigma) * mu
        v = sigma * z / var - mu - (1 - sigma) * self.s**2 * z / var
        return (v.float(),)


def gaussian_ode_solution(noise, mu, s, sigma):
    """Closed form: the ODE maps noise at sigma=1 to
    (1-sigma)*mu + sqrt((1-sigma)^2 s^2 + sigma^2) * noise."""
    return (1 - sigma) * mu + math.sqrt((1 - sigma) ** 2 * s**2 + sigma**2) * noise


def write_prompts(path, repeats=8, seed=0):
    """The demo's prompts file: every prompt `repeats` times, each round in a seeded order (so the last lines,
    the held-out eval samples, differ in colour, shape and direction); sample i is line i, with its own noise
    seed."""
    g = torch.Generator().manual_seed(seed)
    prompts = demo_prompts()
    with open(path, "w") as f:
        for _ in range(repeats):
            f.writelines(prompts[i] + "\n" for i in torch.randperm(len(prompts), generator=g).tolist())


def write_i2v_prompts(folder, repeats=8, seed=0):
    """shapes_i2v.jsonl (and shapes_i2v/, its images) in `folder`: write_prompts' prompts in its order, each with
    the first frame of a tiny-world video of it from a seeded start cell, 64x64 PNG (configs/tiny_ti2v.yaml)."""
    from PIL import Image

    write_prompts(os.path.join(folder, "shapes_i2v.txt"), repeats, seed)
    with open(os.path.join(folder, "shapes_i2v.txt")) as f:
        prompts = f.read().splitlines()
    os.remove(os.path.join(folder, "shapes_i2v.txt"))
    os.makedirs(os.path.join(folder, "shapes_i2v"), exist_ok=True)
    g, rows = torch.Generator().manual_seed(seed + 1), []
    for i, prompt in enumerate(prompts):
        starts = start_cells(parse_prompt(prompt)[2])
        frame = shape_video(prompt, starts[int(torch.randint(len(starts), (1,), generator=g))])[:, 0]
        name = f"shapes_i2v/{i:03d}.png"
        Image.fromarray(to_png_pixels(frame)).save(os.path.join(folder, name))
        rows.append(json.dumps({"prompt": prompt, "image": name}) + "\n")
    with open(os.path.join(folder, "shapes_i2v.jsonl"), "w") as f:
        f.writelines(rows)


def to_png_pixels(frame):
    """[H, W, 3] uint8 numpy of a frame [3, H, W] in [-1, 1]."""
    return ((frame + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


I2V_EXAMPLE = [("a red square moving right", (2, 0)), ("a blue cross moving down", (0, 3))]  # prompt, start cell


def write_i2v_example(folder):
    """prompts/i2v_example.jsonl and its images: the format of an image-to-video prompts file, each image the
    first frame of a tiny-world video (the shape at its start cell), 64x64 PNG."""
    from PIL import Image

    os.makedirs(os.path.join(folder, "i2v_images"), exist_ok=True)
    rows = []
    for prompt, start in I2V_EXAMPLE:
        name = "i2v_images/" + "_".join(prompt.split()[1:3]) + ".png"
        Image.fromarray(to_png_pixels(shape_video(prompt, start)[:, 0])).save(os.path.join(folder, name))
        rows.append(json.dumps({"prompt": prompt, "image": name}) + "\n")
    with open(os.path.join(folder, "i2v_example.jsonl"), "w") as f:
        f.writelines(rows)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEMO_FOLDER, help="folder of the demo model directories")
    parser.add_argument("--rebuild", action="store_true",
                        help="pre-train the demo models from their seeds into --out, replacing what is there")
    parser.add_argument("--steps", type=int, help="with --rebuild: pre-training steps instead of the recipe's")
    parser.add_argument("--detect", metavar="CACHE_DIR",
                        help="instead: print how many cached teacher samples show the prompted colour, shape "
                             "and direction (detect), decoded with the VAE config of the student in --out")
    args = parser.parse_args(argv)
    if args.steps is not None and not args.rebuild:
        parser.error("--steps is the pre-training steps of a rebuild: it needs --rebuild")
    if args.detect:
        with open(os.path.join(args.out, "wan-tiny-demo-student", "vae", "config.json")) as f:
            rates, count = detection_rates(args.detect, json.load(f))
        print(f"{args.detect}: {count} samples; the teacher's x0 shows the prompted "
              + ", ".join(f"{key} in {rate:.1%}" for key, rate in rates.items()) + " (chance: 25%, 50%, 25%)")
        return
    if args.rebuild:
        rebuild(args.out, args.steps)
    problem = demo_models_problem(args.out)
    if problem:
        raise ConfigError(f"{problem}; rebuild with `python tiny_demo.py --rebuild --out {args.out}`")
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in file_digests(args.out, DEMO_MODELS))
    print(f"{args.out}: {', '.join(DEMO_MODELS)} match {MANIFEST} ({size / 2**20:.1f} MiB of files)")


if __name__ == "__main__":
    errors.run_cli(main, sys.argv[1:])
