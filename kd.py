"""ODE-init knowledge distillation of Wan video diffusion models: the method.

A many-step teacher's flow-matching ODE trajectories are cached to disk once (generate_cache.py); a few-step
student learns by MSE to predict the teacher's final clean latent x0 from the cached state at each of its
`t_list` timesteps. The exported student (export.py) is the `ode_init` initialisation of Self-Forcing.

    torchrun --standalone --nproc_per_node=2 kd.py configs/tiny.yaml    # the tiny demo, on CPU
    torchrun --nproc_per_node=8 kd.py configs/wan.yaml                  # Wan2.1-T2V-14B -> 1.3B, one node
    torchrun --nproc_per_node=8 kd.py configs/wan22.yaml                # Wan2.2-T2V-A14B (two experts) -> 1.3B
    python kd.py configs/tiny.yaml training.max_steps=20                # one process, without torchrun

Overrides after the config file are dotted keys whose values are parsed as YAML. With a teacher configured, an
incomplete cache is completed first (generate_cache.py's code, on every rank).

In reading order: the cached-trajectory dataset, the batch and timestep sampler, the student, the loss, the
trainer, main. Elsewhere: Wan's flow matching and the t_list match (flow_matching.py), every config field
(config.py), the cache format (cache_format.py), the teacher (teacher.py), the student's per-frame timesteps
and block-causal attention (wan_student.py), checkpoints (checkpoints.py), the eval's teacher references
(eval_references.py), previews (previews.py).
"""

import hashlib
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import yaml
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

from atomic_files import make_dirs, write_json_atomic, write_lines
from cache_format import open_cache, read_prompt, read_verified, sample_path, verified_tensor
from checkpoints import checkpoint_to_resume, has_ema, load_checkpoint, save_checkpoint
from config import check_paths, config_from_argv, plain
from distributed import barrier, free_device_memory, init_distributed, shutdown_distributed
from ema import EMA
from eval_references import rollout_error, teacher_k_step_samples
from errors import CacheError, ConfigError, run_cli
from flow_matching import add_noise, conditioning_timesteps, teacher_grid, x0_from_velocity
from generate_cache import generate_cache
from i2v import IMAGE_TENSORS, student_channels, teacher_conditioning
from models import compute_dtype, has_vae, load_transformer, load_vae
from previews import write_previews
from run_logs import append_jsonl, eval_line, read_references, reference_path, trim_logs
from teacher import pad_embeds
from tiny_demo import build_missing_models
from wan_student import accept_frame_timesteps, make_block_causal

# ----------------------------------------------------------------------------------------------------------
# The cached-trajectory dataset


class TrajectoryDataset(torch.utils.data.Dataset):
    """Reads, per item (sample index, per-frame t_list entry indices [F]), only the states that item needs.

    Returns x_t [C, F, H, W] (each frame from the state of its own entry; entry K is the clean x0), x0
    [C, F, H, W] and the prompt embeddings zero-padded to the length the teacher saw [max_len, D], all in the
    cache dtype; from a causal ODE cache also the clean context [C, F, H, W] its AR teacher saw, and from an
    image-channel teacher's cache the condition [T + C, F, H, W] and CLIP tokens [tokens, D] it saw (i2v.py).
    """

    def __init__(self, cache_dir, positions, max_len, context=False):
        """positions: the state-axis position of each t_list entry [K + 1] (TeacherGrid.entry_positions)."""
        self.cache_dir, self.positions, self.max_len, self.context = cache_dir, positions, max_len, context

    def __getitem__(self, key):
        """The item of (sample index, per-frame step indices [F]); each slice read is checked (CacheError)."""
        index, steps = key
        path = sample_path(self.cache_dir, index)
        x_t, x0, embeds, extra = read_verified(path, lambda f, metadata: self.read_states(f, metadata, steps,
                                                                                          path), "cached sample")
        return {"x_t": x_t, "x0": x0, "prompt_embeds": pad_embeds(embeds, self.max_len),
                "steps": torch.tensor(steps), "index": index, **extra}

    def read_states(self, f, metadata, steps, path):
        """(x_t [C, F, H, W], x0 [C, F, H, W], prompt embeddings [L, D], {the context, the I2V inputs the file
        holds}) from the open file f, each read checked against its CRC32."""
        crcs = json.loads(metadata["crc32_latents"])  # [K+1][F]
        latents = f.get_slice("latents")  # [K+1, C, F, H, W] on disk
        runs, start = [], 0
        for end in range(1, len(steps) + 1):  # consecutive frames drawing the same state: one slice
            if end == len(steps) or steps[end] != steps[start]:
                runs.append(latents[self.positions[steps[start]], :, start:end])
                start = end
        x_t = torch.cat(runs, dim=1)  # [C, F, H, W]
        kept = [self.positions[-1]] + [len(crcs) - 1] * self.context  # x0, and a causal ODE cache's context last
        x0, *context = (latents[k] for k in kept)  # [C, F, H, W] each
        embeds, _, *image = (verified_tensor(f.get_tensor(name), metadata[f"crc32_{name}"], path, name)
                             for name in ("prompt_embeds", "timesteps", *IMAGE_TENSORS) if name in f.keys())
        for frame, step in enumerate(steps):
            state = self.positions[step]
            verified_tensor(x_t[:, frame], crcs[state][frame], path, f"latents[{state}, :, {frame}]")
            for k, tensor in zip(kept, [x0, *context]):
                verified_tensor(tensor[:, frame], crcs[k][frame], path, f"latents[{k}, :, {frame}]")
        return x_t, x0, embeds, {**({"context": context[0]} if context else {}), **dict(zip(IMAGE_TENSORS, image))}

    def __getitems__(self, keys):
        """A DataLoader batch; a CacheError comes back as data, [{"error": message}], so that the training
        process reports it in one line (a worker's exception would come back with its traceback as message).
        """
        try:
            return [self[key] for key in keys]
        except CacheError as e:
            return [{"error": str(e)}]


def collate(items):
    """default_collate, passing through the error item of TrajectoryDataset.__getitems__."""
    return items[0] if "error" in items[0] else torch.utils.data.default_collate(items)


def next_batch(batches):
    """The next DataLoader batch; a cache file that failed to read or verify raises its CacheError here."""
    batch = next(batches)
    if "error" in batch:
        raise CacheError(batch["error"])
    return batch


# ----------------------------------------------------------------------------------------------------------
# The batch and timestep sampler


def stable_seed(*parts):
    """A 63-bit seed from any parts, the same in every process and run."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class KDBatchSampler:
    """Endless (sample index, step indices) batches for one rank, from micro-batch `start` on.

    Epoch e shuffles the training indices from (seed, e); rank r takes a fixed stride of the shuffle (all
    ranks equally many); micro-batch p draws its timesteps from (seed, rank, p). Batch p is therefore the same
    whether the run started at 0 or resumed at p."""

    def __init__(self, train_indices, batch_size, rank, world_size, seed, num_frames, sample_steps, start=0):
        self.train, self.batch_size, self.rank, self.world = train_indices, batch_size, rank, world_size
        self.seed, self.num_frames, self.sample_steps, self.start = seed, num_frames, sample_steps, start
        self.per_epoch = len(train_indices) // world_size // batch_size
        if self.per_epoch < 1:
            raise ConfigError(f"{len(train_indices)} training samples cannot fill one batch of training.batch_size="
                              f"{batch_size} on each of {world_size} ranks; generate more samples or lower "
                              "training.eval_samples")

    def batch(self, position):
        """Micro-batch `position` of this rank: [(sample index, per-frame step indices)] * batch_size."""
        epoch, j = divmod(position, self.per_epoch)
        shuffle = torch.Generator().manual_seed(stable_seed(self.seed, epoch))
        order = torch.randperm(len(self.train), generator=shuffle)
        mine = order[: self.per_epoch * self.batch_size * self.world][self.rank :: self.world]
        chosen = mine[j * self.batch_size : (j + 1) * self.batch_size].tolist()
        g = torch.Generator().manual_seed(stable_seed(self.seed, self.rank, position))
        steps = self.sample_steps(g, len(chosen), self.num_frames)  # [B, F]
        return [(self.train[i], tuple(row)) for i, row in zip(chosen, steps.tolist())]

    def __iter__(self):
        """Micro-batches from `start` on, endlessly."""
        position = self.start
        while True:
            yield self.batch(position)
            position += 1


# ----------------------------------------------------------------------------------------------------------
# The student: Wan2.1 with one timestep per latent frame and, for causal students, block-causal attention
# (wan_student.py), FSDP2-sharded.


def build_student(cfg, device):
    """The student transformer: fp32 parameters, FSDP2-sharded per block then at the root, bf16 on GPU.

    Inputs are cast by student_velocity, not by FSDP: its input cast would round the timesteps to bf16 too
    (937.5 -> 936), and the student must be conditioned on exactly its timesteps."""
    model = load_transformer(cfg.models.student.init_from, torch.device("cpu"))
    return shard_student(model, cfg.models.student.attention, cfg.method.num_frames_per_block,
                         cfg.training.gradient_checkpointing, device, cfg.method.first_frame_given)


def shard_student(model, attention, frames_per_block, gradient_checkpointing, device, first_frame_alone=False):
    """`model` with per-frame timesteps, attention and checkpointing set, FSDP2-sharded (bench_gpu too)."""
    # Wan returns a reshaped view; we only read it out of place, which FSDP2's warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    accept_frame_timesteps(model)
    if attention == "block_causal":
        make_block_causal(model, frames_per_block, first_frame_alone)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if device.type == "cuda" else None,
                              reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model.to(device)


def student_velocity(model, x_t, t_frames, uniform, prompt_embeds, context=None, image=None):
    """v [B, C, F, H, W] fp32 for inputs x_t [B, C, F, H, W] at per-frame timesteps t_frames [B, F] (fp32);
    with a clean `context` [B, C, F, H, W], each block of x_t sees the context's earlier blocks (teacher
    forcing, causal ODE); `image`: an I2V student's input channels and CLIP tokens (i2v.Channels)."""
    dtype, extra = compute_dtype(x_t.device), {}
    if context is not None:
        x_t, t_frames = torch.cat([context, x_t], dim=2), torch.cat([torch.zeros_like(t_frames), t_frames], dim=1)
        extra["teacher_forcing"] = True
    if image is not None:
        x_t = image.model_input(x_t)
        if image.image_embeds is not None:
            extra["encoder_hidden_states_image"] = image.image_embeds.expand(len(x_t), -1, -1).to(dtype)
    timestep = t_frames[:, 0] if uniform and context is None else t_frames  # [B], or [B, F] per frame
    return model(x_t.to(dtype), timestep.float(), prompt_embeds.to(dtype), return_dict=False, **extra)[0].float()


# ----------------------------------------------------------------------------------------------------------
# The loss


def x0_prediction(x_t, v, sigma_frames):
    """x0 = x_t - sigma * v with one sigma per frame: sigma_frames [B, F]."""
    return x0_from_velocity(x_t, v, sigma_frames[:, None, :, None, None])


def kd_frame_losses(model, x_t, x0, t_frames, sigma_frames, uniform, prompt_embeds, context=None, image=None):
    """MSE(x0_pred, x0_teacher) per frame [B, F], fp32; its mean over the noisy frames is the loss, on the scale of
    Self-Forcing's and Causal Forcing's F.mse_loss (a clean frame, sigma 0, is its own x0 prediction: it is
    context for the others, and carries no loss)."""
    v = student_velocity(model, x_t, t_frames, uniform, prompt_embeds, context, image)
    return (x0_prediction(x_t, v, sigma_frames) - x0).pow(2).mean(dim=(1, 3, 4))


# ----------------------------------------------------------------------------------------------------------
# The trainer


class KDTrainer:
    """The KD run: the student learns x0 from the teacher's cached states at its t_list timesteps.

    prepare() sets the run up (cache, data, references, student, optimizer, resume); train() is the loop: a
    step, and at its intervals a log line, an eval and a checkpoint."""

    causal_ode = False  # trains on an AR teacher's pairs, each with its clean context (read with the data)
    loss_name = "kd loss"  # in the eval's console line
    trains_on_clean_data = False  # a cache of clean latents only (latent_data.py) is its data

    def __init__(self, cfg, rank, world_size, device):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.grid = teacher_grid(cfg)
        self.t_list = [float(t) for t in cfg.method.t_list]
        self.num_steps = len(self.t_list) - 1  # K
        # Per t_list entry [K + 1]: the timestep the student is conditioned on, and the matched grid sigma of
        # x0 = x_t - sigma * v; entry K is the clean x0, at timestep 0 and sigma 0.
        self.t_values = torch.tensor(conditioning_timesteps(cfg) + [0.0], device=device)
        self.sigmas = torch.tensor(self.grid.student_sigmas + [0.0], device=device)
        # the first step whose loss or gradient norm was not finite (inf: none so far)
        self.first_bad_step = torch.tensor(float("inf"), device=device)
        self.step, self.vae, self.wandb, self.ema = 0, None, None, None
        self.last_image = (None, None)  # (sample index, its I2V inputs): sample_image's
        self.streaming = cfg.models.student.attention == "block_causal"  # also judge it generating in blocks

    def sample_step_indices(self, generator, batch_size, num_frames):
        """Per-frame t_list entry indices [B, F] in [0, K): one uniform draw per sample, for its frames."""
        per_sample = torch.randint(self.num_steps, (batch_size, 1), generator=generator)
        return per_sample.expand(batch_size, num_frames)

    def step_indices(self, generator, batch_size, num_frames):
        """sample_step_indices [B, F]; a given first frame (image-to-video) reads the clean entry K: context at
        timestep 0, no loss."""
        steps = self.sample_step_indices(generator, batch_size, num_frames)
        if not self.cfg.method.first_frame_given:
            return steps
        return torch.cat([torch.full_like(steps[:, :1], self.num_steps), steps[:, 1:]], dim=1)

    # -- set-up ------------------------------------------------------------------------------------------

    def prepare(self):
        """The cache (completed if needed), data, eval references, then the student, optimizer, resume."""
        self.prepare_data()
        self.references = read_references(self.cfg.training.output_dir)
        self.prepare_previews()
        self.prepare_teacher_reference()
        free_device_memory(self.device)  # no teacher or text encoder is left before the student's optimizer
        self.build_student_and_optimizer()
        self.resume()
        trim_logs(self.cfg.training.output_dir, self.step, self.rank)
        if "untrained" not in self.references and self.eval_indices and self.rollout_names():
            if self.step:
                raise CacheError("cannot measure the untrained student's reference on a resumed run: "
                                 f"{reference_path(self.cfg.training.output_dir)} is missing")
            untrained = self.evaluate()  # rollout_error_X is kept as untrained_X
            self.references.update({"untrained" + name.removeprefix("rollout_error"): untrained[name]
                                    for name in self.rollout_names()})
        if self.rank == 0:
            write_json_atomic(reference_path(self.cfg.training.output_dir), self.references)
        barrier()

    def prepare_data(self):
        """The complete cache (generated first if there is a teacher), the train/eval split, the dataset."""
        cfg, t = self.cfg, self.cfg.training
        if not os.path.exists(os.path.join(cfg.method.teacher_path_cache, "COMPLETE")) and cfg.models.teacher:
            generate_cache(cfg, self.rank, self.world_size, self.device)
        self.meta = open_cache(cfg)  # the seed's error when incomplete without a teacher
        self.check_cache_kind(cfg.method.teacher_path_cache)
        n = self.meta["num_samples"]
        if t.eval_samples >= n:
            raise ConfigError(f"training.eval_samples={t.eval_samples} must be below the {n} cached samples")
        self.train_indices = list(range(n - t.eval_samples))
        self.eval_indices = list(range(n - t.eval_samples, n))
        positions = [0] * (self.num_steps + 1) if self.clean_data else self.grid.entry_positions
        self.dataset = TrajectoryDataset(cfg.method.teacher_path_cache, positions,
                                         self.meta["max_sequence_length"], self.causal_ode)
        make_dirs(t.output_dir)
        if self.rank == 0:  # export.py reads it to find the student's base model
            write_lines(os.path.join(t.output_dir, "config.yaml"),
                        [yaml.safe_dump(plain(cfg), sort_keys=False, allow_unicode=True)])

    def check_cache_kind(self, cache):
        """ConfigError unless this trainer trains on what the cache holds: a bidirectional teacher's pairs, an AR
        teacher's (causal_ode.py), or clean latents only (latent_data.py's: ar_diffusion.py)."""
        self.clean_data = bool(self.meta.get("clean_data"))  # each sample's x0 and no trajectory
        if self.clean_data and not self.trains_on_clean_data:
            raise ConfigError(f"{cache} holds clean latents only (latent_data.py), no teacher trajectories: train "
                              "an AR teacher on it (ar_diffusion.py) or name it as method.context_cache")
        image = self.meta.get("conditioning")  # a student of an image-channel teacher's architecture takes its inputs
        self.takes_image = teacher_conditioning(self.cfg.models.student.init_from) == "channels"
        if isinstance(image, dict) and not self.cfg.method.first_frame_given and not self.takes_image:
            raise ConfigError(f"{cache} holds an image-conditioned teacher's pairs: train a student that continues "
                              "their first frame (method.first_frame_given: true)")
        if bool(self.meta.get("causal_ode")) != self.causal_ode:
            raise ConfigError(f"{cache} holds causal ODE pairs: train a block-causal student on them with "
                              "causal_ode.py" if not self.causal_ode else f"{cache} holds a bidirectional "
                              "teacher's pairs, not an AR teacher's: train on them with kd.py or kd_causal.py")

    def prepare_previews(self):
        """The held-out samples decoded at each eval: the first preview_samples, if the student has a VAE."""
        t, student = self.cfg.training, self.cfg.models.student.init_from
        self.preview_indices = self.eval_indices[: t.preview_samples] if t.previews else []
        if self.preview_indices and not has_vae(student):
            self.log(f"previews off: {student} has no vae/ to decode them with")
            self.preview_indices = []

    def prepare_teacher_reference(self):
        """The teacher's own K-step x0 of the samples that need it, and its rollout error once per run."""
        indices, max_len = self.teacher_sample_indices(), self.meta["max_sequence_length"]
        self.teacher_k_step = teacher_k_step_samples(self.cfg, indices, self.load_eval_sample,
                                                     self.sigmas[: self.num_steps], max_len,
                                                     self.device)  # {index: x0}
        if self.cfg.models.teacher is not None and "teacher" not in self.references and self.eval_indices:
            self.references["teacher"] = rollout_error(self.teacher_k_step, self.eval_indices,
                                                       self.load_eval_sample, self.rank, self.world_size,
                                                       self.device, int(self.cfg.method.first_frame_given))

    def teacher_sample_indices(self):
        """The eval samples whose teacher K-step x0 this rank needs: its stride while the teacher's reference
        is missing, and rank 0's preview samples (none without a teacher)."""
        if self.cfg.models.teacher is None or not self.eval_indices:
            return []
        mine = self.eval_indices[self.rank :: self.world_size] if "teacher" not in self.references else []
        return sorted(set(mine) | set(self.preview_indices if self.rank == 0 else []))

    def build_student_and_optimizer(self):
        """The FSDP2 student, fused AdamW, the LR schedule and the weights' EMA if asked for."""
        t = self.cfg.training
        self.model = build_student(self.cfg, self.device)
        latent, image = self.meta["latent_shape"][0], self.meta.get("conditioning")
        extra = image.get("condition_channels", 0) if isinstance(image, dict) else 0  # an I2V teacher's inputs
        if self.model.config.in_channels not in (latent, latent + extra):
            raise ConfigError(f"the student takes {self.model.config.in_channels} input channels, the cache holds "
                              f"{latent} latent channels" + (f" ({latent + extra} with its images')" if extra else ""))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=tuple(t.betas),
                                           weight_decay=t.weight_decay, eps=t.eps, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t))
        if t.ema_decay > 0:
            self.ema = EMA(self.model, t.ema_decay, t.ema_start_step)

    def data_loader(self, start):
        """Endless training batches from micro-batch `start` on, read by DataLoader workers."""
        t = self.cfg.training
        sampler = KDBatchSampler(self.train_indices, t.batch_size, self.rank, self.world_size, t.seed,
                                 self.meta["latent_shape"][1], self.step_indices, start)
        workers = {}
        if t.num_workers:
            workers = dict(num_workers=t.num_workers, prefetch_factor=t.prefetch_factor,
                           persistent_workers=True)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate,
                                           pin_memory=self.device.type == "cuda", **workers)

    # -- checkpoints --------------------------------------------------------------------------------------

    def save_checkpoint(self):
        """checkpoint-{step} of model, optimizer, scheduler, data position and RNG (all ranks)."""
        t = self.cfg.training
        state = {"step": self.step, "micro_batches": self.step * t.grad_accum_steps,
                 "scheduler": self.scheduler.state_dict(), "world_size": self.world_size}
        save_checkpoint(t.output_dir, self.step, self.model, self.optimizer, state, t.keep_checkpoints,
                        self.rank, self.device, self.ema)

    def resume(self):
        """Continue from the checkpoint training.resume names (auto: the highest complete one), if any."""
        path = checkpoint_to_resume(self.cfg.training.output_dir, self.cfg.training.resume, self.rank)
        if path is not None:
            fresh_ema = self.ema is not None and not has_ema(path)  # the run that wrote it kept no EMA
            state = load_checkpoint(path, self.model, self.optimizer, self.rank, self.device,
                                    None if fresh_ema else self.ema)
            if fresh_ema:
                self.ema = EMA(self.model, self.cfg.training.ema_decay, self.cfg.training.ema_start_step)
                self.log(f"{path} holds no EMA (its run had training.ema_decay=0): the EMA starts from its weights")
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = state["step"]
            self.log(f"resumed from {path} at step {self.step}")

    # -- evaluation ---------------------------------------------------------------------------------------

    def load_eval_sample(self, index):
        """On the device: states [K, C, F, H, W] at the t_list entries, x0 [C, F, H, W], embeds [1, L, D], and
        a causal ODE cache's context [1, C, F, H, W] (else None)."""
        items = [self.dataset[(index, (k,) * self.meta["latent_shape"][1])] for k in range(self.num_steps)]
        states = torch.stack([item["x_t"] for item in items]).to(self.device).float()
        x0, embeds, context = items[0]["x0"], items[0]["prompt_embeds"][None], items[0].get("context")
        context = context[None].to(self.device).float() if context is not None else None
        return states, x0.to(self.device).float(), embeds.to(self.device).float(), context

    def rank_share(self, indices):
        """This rank's stride of `indices`, padded with weight-0 repeats: all ranks run as many forwards."""
        per_rank = -(-len(indices) // self.world_size)
        mine = indices[self.rank :: self.world_size]
        return [(i, 1.0) for i in mine] + [(indices[0], 0.0)] * (per_rank - len(mine))

    @torch.no_grad()
    def evaluate(self):
        """Held-out KD loss per noisy t_list entry; the rollout error against the teacher's x0 of the student's
        K-step sampling (and, for block-causal students, of its streaming sampling)."""
        self.model.eval()
        K, rollouts = self.num_steps, self.rollout_names()
        # [K per-entry losses, then the rollout errors]
        sums = torch.zeros(K + len(rollouts), device=self.device, dtype=torch.float64)
        for index, weight in self.rank_share(self.eval_indices):
            states, x0, embeds, context = self.load_eval_sample(index)
            sums[:K] += weight * self.eval_losses(index, states, x0, embeds, context).mean(dim=1).double()
            for j, error in enumerate(self.rollout_errors(index, states[:1], embeds, x0) if rollouts else []):
                sums[K + j] += weight * error.double()
        dist.all_reduce(sums)
        sums /= len(self.eval_indices)
        self.model.train()
        result = {f"loss_t{self.t_list[k]:g}": sums[k].item() for k in range(K)}
        result["loss"] = sums[:K].mean().item()
        result.update({name: sums[K + j].item() for j, name in enumerate(rollouts)})
        return result

    def eval_losses(self, index, states, x0, embeds, context):
        """The held-out loss [K, F] of one sample at each noisy t_list entry (load_eval_sample's tensors); of the
        frames after a given first frame, which is x0's, at timestep 0."""
        K, g, frames = self.num_steps, int(self.cfg.method.first_frame_given), states.shape[2]
        states = torch.cat([x0[None, :, :g].expand(K, -1, -1, -1, -1), states[:, :, g:]], dim=2)

        def per_frame(values):  # [K, F]: entry k's value, 0 (clean) for a given first frame
            return torch.cat([values.new_zeros(K, g), values[:K, None].expand(K, frames - g)], dim=1)

        return kd_frame_losses(self.model, states, x0[None], per_frame(self.t_values), per_frame(self.sigmas), g == 0,
                               embeds.expand(K, -1, -1), None if context is None else context.expand(K, -1, -1, -1, -1),
                               self.sample_image(index))[:, g:]

    def rollout_names(self):
        """The eval's rollout errors, in rollout_errors' order."""
        return ["rollout_error"] + (["rollout_error_streaming"] if self.streaming else [])

    def rollout_errors(self, index, noise, embeds, x0):
        """[MSE] of each of student_samples against the teacher's cached x0 [C, F, H, W], over the frames it
        generates (a given first frame is the teacher's own)."""
        g = int(self.cfg.method.first_frame_given)
        return [(sample - x0)[:, g:].pow(2).mean() for sample in self.student_samples(index, noise, embeds, x0)]

    def student_samples(self, index, noise, embeds, x0):
        """x0 [C, F, H, W] of the student's K-step sampling from a sample's cached initial noise [1, C, F, H, W]
        and, for block-causal students, of its streaming sampling (fresh noise seeded by the sample); with
        method.first_frame_given both continue the first frame of the teacher's x0 [C, F, H, W]."""
        first = x0[None, :, :1] if self.cfg.method.first_frame_given else None  # [1, C, 1, H, W]
        rest, image = noise[:, :, 0 if first is None else 1 :], self.sample_image(index)
        one_pass = sample_frames(self.model, rest, embeds, self.t_values, self.sigmas, first, image=image)
        samples = [one_pass[0] if first is None else torch.cat([first, one_pass], dim=2)[0]]
        if self.streaming:
            seed = stable_seed(self.cfg.training.seed, "streaming", index)
            samples.append(streaming_sample(self.model, noise, embeds, self.t_values, self.sigmas,
                                            self.cfg.method.num_frames_per_block, seed, first, image)[0])
        return samples

    def sample_image(self, index):
        """An I2V student's input channels and CLIP tokens for sample `index` (i2v.Channels), else None; the last
        sample's is kept, since its eval losses, rollouts and preview each ask for it in turn."""
        if not self.takes_image:
            return None
        if self.last_image[0] != index:
            self.last_image = (index, student_channels(self.dataset[(index, (0,) * self.meta["latent_shape"][1])],
                                                       self.device))
        return self.last_image[1]

    def given_image(self, index, x0):
        """[C, 1, H, W]: the latent of the image sample `index` continues: x0's first frame, or the first frame
        of an I2V student's condition latent (after its mask channels)."""
        if self.cfg.method.first_frame_given:
            return x0[:, :1]
        return self.sample_image(index).condition[0, -x0.shape[0] :, :1]

    @torch.no_grad()
    def write_eval_previews(self):
        """output_dir/previews/step-N/: (given image |) teacher 48-step | teacher K-step | student K-step (|
        streaming), labelled; an image-to-video run's given image is held as a still.

        Every rank runs the student's rollouts (the FSDP forward is collective); rank 0 decodes and writes.
        """
        self.model.eval()
        samples, given = [], self.cfg.method.first_frame_given or self.takes_image
        for index in self.preview_indices:
            states, x0, embeds, _ = self.load_eval_sample(index)
            teacher_k = [self.teacher_k_step[index]] if index in self.teacher_k_step else []
            image = [self.given_image(index, x0).expand_as(x0)] if given else []
            samples.append((index, [*image, x0, *teacher_k, *self.student_samples(index, states[:1], embeds, x0)]))
        self.model.train()
        if self.rank != 0:
            return
        if self.vae is None:
            self.vae = load_vae(self.cfg.models.student.init_from, self.device)
        K = self.num_steps
        labels = [*(["given image"] if given else []), f"teacher {self.cfg.method.teacher_inference_steps}-step x0",
                  *([f"teacher {K}-step"] if self.teacher_k_step else []), f"student {K}-step",
                  *([f"student {K}-step streaming"] if self.streaming else [])]
        folder = os.path.join(self.cfg.training.output_dir, "previews", f"step-{self.step}")
        prompts = {i: read_prompt(self.cfg.method.teacher_path_cache, i) for i in self.preview_indices}
        write_previews(folder, self.vae, samples, labels, prompts)
        self.log(f"previews ({' | '.join(labels)}) written to {folder}")

    def run_eval(self):
        """Evaluate (the EMA weights too), write previews, log the result beside the references to eval.jsonl
        and the console."""
        result = self.evaluate()
        if self.ema is not None:
            with self.ema.weights_in(self.model):
                ema = self.evaluate()
            result.update({f"{k}_ema": v for k, v in ema.items() if k == "loss" or k.startswith("rollout")})
        if self.preview_indices:
            self.write_eval_previews()
        self.append_jsonl("eval.jsonl", {"step": self.step, **result,
                                         **{f"rollout_error_{k}": v for k, v in self.references.items()}})
        self.log(eval_line(self.step, result, self.references, self.num_steps, self.loss_name))
        return result

    # -- the loop -----------------------------------------------------------------------------------------

    def log(self, text):
        """Print on rank 0, above the progress bar."""
        if self.rank == 0:
            tqdm.write(text)

    def append_jsonl(self, name, record):
        """Append one JSON line to output_dir/name on rank 0 (and to wandb when it is on)."""
        if self.rank == 0:
            append_jsonl(self.cfg.training.output_dir, name, record, self.wandb)

    def train_step(self, batches):
        """One optimizer step over the micro-batches: (loss sums per noisy entry [K], counts [K], grad norm).

        The loss is the mean over this rank's noisy frames; frames that drew entry K, the clean x0, are context
        for the others (causal students) and carry no loss."""
        K, accum = self.num_steps, len(batches)
        noisy_frames = max(1, sum(self.loss_frames(b) for b in batches))  # CPU copies: no device sync
        entry_loss = torch.zeros(K + 1, device=self.device)
        entry_count = torch.zeros(K + 1, device=self.device)
        step_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            self.model.set_requires_gradient_sync(i == accum - 1)  # reduce-scatter once per optimizer step
            frame_loss, steps = self.batch_losses(batch)  # [B, F] each
            loss = torch.where(steps < K, frame_loss, 0.0).sum() / noisy_frames
            loss.backward()
            with torch.no_grad():
                step_loss += loss.detach()
                entry_loss.index_add_(0, steps.flatten(), frame_loss.detach().flatten())
                entry_count.index_add_(0, steps.flatten(), torch.ones_like(frame_loss).flatten())
        max_norm = self.cfg.training.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   max_norm if max_norm > 0 else float("inf"), foreach=True)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # Noted on the device, read by check_finite: a host sync here would stall the GPU queue every step.
        bad = ~torch.isfinite(step_loss + grad_norm)
        self.first_bad_step = torch.where(bad & self.first_bad_step.isinf(), float(self.step + 1),
                                          self.first_bad_step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        return entry_loss[:K], entry_count[:K], grad_norm

    def loss_frames(self, batch):
        """The frames of a micro-batch that carry loss, counted on its CPU copy: all but the clean context's."""
        return int((batch["steps"] < self.num_steps).sum())

    def batch_losses(self, batch):
        """(the loss of each frame [B, F], the t_list entry it drew [B, F]) of one micro-batch."""
        x_t = batch["x_t"].to(self.device, non_blocking=True).float()  # [B, C, F, H, W]
        x0 = batch["x0"].to(self.device, non_blocking=True).float()
        embeds = batch["prompt_embeds"].to(self.device, non_blocking=True).float()  # [B, max_len, D]
        steps = batch["steps"].to(self.device, non_blocking=True)  # [B, F]
        uniform = bool((batch["steps"] == batch["steps"][:, :1]).all())  # on the CPU copy: no device sync
        context = batch["context"].to(self.device).float() if self.causal_ode else None
        return kd_frame_losses(self.model, x_t, x0, self.t_values[steps], self.sigmas[steps], uniform, embeds,
                               context, student_channels(batch, self.device) if self.takes_image else None), steps

    def check_finite(self):
        """Stop if a step so far had a non-finite loss or gradient norm, before its weights are saved or used.
        """
        first = self.first_bad_step.clone()
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if torch.isfinite(first):
            raise FloatingPointError(f"non-finite loss or gradient norm at step {int(first)}; stopping "
                                     "without saving the weights of that step or later")

    def log_metrics(self, window, window_steps, elapsed):
        """One metrics.jsonl line from a window of steps: [K per-entry loss sums, K counts, grad-norm sum]."""
        t, K = self.cfg.training, self.num_steps
        dist.all_reduce(window)
        sums, counts = window[:K], window[K : 2 * K]
        record = {"step": self.step, "loss": (sums.sum() / counts.sum().clamp(min=1)).item()}
        record.update({f"loss_t{self.t_list[k]:g}": (sums[k] / counts[k]).item() if counts[k] > 0 else None
                       for k in range(K)})
        samples = window_steps * t.grad_accum_steps * t.batch_size * self.world_size
        record.update({"lr": self.scheduler.get_last_lr()[0],
                       "grad_norm": window[2 * K].item() / (window_steps * self.world_size),
                       "samples_per_s": samples / elapsed})
        self.append_jsonl("metrics.jsonl", record)
        return record

    def train(self):
        """The loop: a step, then at their intervals a metrics line, an eval, a checkpoint; to max_steps."""
        t = self.cfg.training
        if t.wandb_project and self.rank == 0:
            import wandb  # optional: imported only when asked for

            self.wandb = wandb
            wandb.init(project=t.wandb_project, config=plain(self.cfg), dir=t.output_dir)
        self.model.train()
        batches = iter(self.data_loader(start=self.step * t.grad_accum_steps))
        bar = tqdm(total=t.max_steps, initial=self.step, disable=self.rank != 0, desc="kd",
                   dynamic_ncols=True)
        # [K per-entry loss sums, K counts, the grad-norm sum] since the last metrics line
        window = torch.zeros(2 * self.num_steps + 1, device=self.device)
        window_steps, window_start = 0, time.perf_counter()
        while self.step < t.max_steps:
            micro_batches = [next_batch(batches) for _ in range(t.grad_accum_steps)]
            loss_sums, counts, grad_norm = self.train_step(micro_batches)
            window += torch.cat([loss_sums, counts, grad_norm.reshape(1).to(window.dtype)])
            window_steps += 1
            bar.update(1)
            last = self.step == t.max_steps
            log, evaluate = self.step % t.log_every == 0 or last, self.step % t.eval_every == 0 or last
            save = self.step % t.checkpoint_every == 0 or last
            if log or evaluate or save:
                self.check_finite()
            if log:
                record = self.log_metrics(window, window_steps, time.perf_counter() - window_start)
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


# ----------------------------------------------------------------------------------------------------------
# Sampling with the student: as the eval and the previews judge it, and as it will be used


def sample_frames(model, x, embeds, t_values, sigmas, context=None, generator=None, image=None):
    """x0 [1, C, f, H, W] of the student's K-step sampling of frames x [1, C, f, H, W], from entry 0's noise
    level, after the clean frames `context` [1, C, c, H, W] fed at timestep 0 (block-causal students).

    At entry k the student predicts x0, which is re-noised to entry k + 1's sigma: with fresh noise from
    `generator` (Self-Forcing's sampling), or without one with the noise the prediction implies, which makes
    the step Euler's deterministic ODE step, as diffusers' FlowMatchEulerDiscreteScheduler takes it.
    t_values, sigmas: [K + 1] per t_list entry, as KDTrainer holds them; image: an I2V student's input channels.
    """
    context = x[:, :, :0] if context is None else context
    c = context.shape[2]
    for k in range(len(t_values) - 1):
        t = torch.cat([t_values.new_zeros(c), t_values[k].expand(x.shape[2])])[None]  # [1, c + f]
        v = student_velocity(model, torch.cat([context, x], dim=2), t, c == 0, embeds, image=image)[:, :, c:]
        x0 = x0_from_velocity(x, v, sigmas[k])
        if k + 2 < len(t_values):
            eps = ((x - (1 - sigmas[k]) * x0) / sigmas[k] if generator is None
                   else torch.randn(x.shape, generator=generator, device=x.device))
            x = add_noise(x0, eps, sigmas[k + 1])
    return x0


def streaming_sample(model, noise, embeds, t_values, sigmas, frames_per_block, seed=None, first=None, image=None):
    """x0 [1, C, F, H, W] generated block by block as Self-Forcing's causal inference does: each block from its
    own initial noise in `noise` [1, C, F, H, W] through the K steps, re-noised with fresh noise seeded by
    (seed, block) (seed None: the deterministic Euler steps), attending to the clean x0 of the blocks before
    it at timestep 0; after the given first frame `first` [1, C, 1, H, W] if any (image-to-video). The
    block-causal student computes the prefix afresh at each step instead of keeping a KV cache: the same
    numbers, simpler, more compute."""
    done = noise[:, :, :0] if first is None else first
    for start in range(done.shape[2], noise.shape[2], frames_per_block):
        generator = None if seed is None else torch.Generator(noise.device).manual_seed(stable_seed(seed, start))
        block = sample_frames(model, noise[:, :, start : start + frames_per_block], embeds, t_values, sigmas, done,
                              generator, image)
        done = torch.cat([done, block], dim=2)
    return done


def lr_lambda(t):
    """The LR factor of optimizer step s: linear warmup, then constant or cosine to 0 at max_steps."""

    def factor(step):
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "cosine":
            progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def main(argv, trainer_cls=KDTrainer):
    """kd.py CONFIG.yaml [key.path=value ...]: complete the cache if needed, then distil (every rank)."""
    cfg = config_from_argv(argv)
    build_missing_models(cfg)
    check_paths(cfg)
    rank, world_size, device = init_distributed()
    torch.manual_seed(stable_seed(cfg.training.seed, rank))
    trainer = trainer_cls(cfg, rank, world_size, device)
    trainer.prepare()
    trainer.train()
    shutdown_distributed()


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
