"""AR diffusion by teacher forcing (Causal Forcing's stage 1): the model becomes an autoregressive teacher.

    torchrun --standalone --nproc_per_node=2 ar_diffusion.py configs/tiny_ar.yaml     # the tiny demo, on CPU
    torchrun --nproc_per_node=8 ar_diffusion.py configs/wan_ar.yaml
    python export.py --checkpoint runs/tiny_ar --output-dir exports/tiny_ar_teacher   # the AR teacher directory

The block-causal model (models.student, attention block_causal) is fine-tuned with the flow-matching loss on a
noisy copy of each clean video while every block attends to the clean earlier blocks of the same video
(teacher forcing; method.num_frames_per_block frames per block, 1 for frame-wise). The clean videos are the x0
of a complete cache (method.teacher_path_cache: the bidirectional teacher's own samples, as Causal Forcing takes
them, or an imported LMDB's). Each block draws its own noise level, uniformly over the 1000 points of the shifted
training grid (pipeline.flow_shift), and the loss is the MSE of the predicted velocity against eps - x0, every
frame in it (Causal Forcing weights it by a bell over t; here it is flat).

Everything else is kd.py's (data, FSDP2, checkpoints and bit-equal resume, EMA, logs): the per-entry losses are
logged by the t_list interval each block's timestep falls in, and the eval measures the held-out flow-matching
loss at each t_list entry and the model's own K-step sampling (one pass and streaming) against the cached x0.
export.py writes the trained model with its block size in transformer/config.json: an AR teacher directory that
generate_cache.py loads for causal ODE pairs (docs/causal.md).
"""

import sys

import torch

import kd
import kd_causal
from errors import run_cli
from flow_matching import NUM_TRAIN_TIMESTEPS, add_noise, shifted_sigmas

TRAINING_POINTS = 1000  # the shifted grid the blocks' noise levels are drawn from (Causal Forcing's)


class ARDiffusionTrainer(kd_causal.CausalKDTrainer):
    """KDTrainer whose loss is teacher-forced flow matching on the cache's clean x0."""

    loss_name = "flow-matching loss"
    trains_on_clean_data = True

    def __init__(self, cfg, rank, world_size, device):
        super().__init__(cfg, rank, world_size, device)
        kd_causal.check_text_to_video_causal(cfg, "ar_diffusion.py", "an autoregressive teacher")
        self.train_sigmas = shifted_sigmas(TRAINING_POINTS, cfg.pipeline.flow_shift).float().to(device)

    def sample_step_indices(self, generator, batch_size, num_frames):
        """Every frame reads the clean x0 (entry K); the noise levels are drawn in batch_losses."""
        return torch.full((batch_size, num_frames), self.num_steps)

    def loss_frames(self, batch):
        return batch["x0"][:, 0, :, 0, 0].numel()  # every frame of the noisy copy

    def block_sigmas(self, batch_size, num_frames, generator):
        """One sigma per block [B, F], uniform over the shifted training grid."""
        block = self.cfg.method.num_frames_per_block
        index = torch.randint(TRAINING_POINTS, (batch_size, -(-num_frames // block)), device=self.device,
                              generator=generator)
        return self.train_sigmas[index].repeat_interleave(block, dim=1)[:, :num_frames]

    def flow_losses(self, x0, embeds, sigma, eps):
        """MSE of the velocity on the noisy copy [B, F], every block seeing the clean blocks before it."""
        x_t = add_noise(x0, eps, sigma[:, None, :, None, None])
        v = kd.student_velocity(self.model, x_t, sigma * NUM_TRAIN_TIMESTEPS, False, embeds, context=x0)
        return (v - (eps - x0)).pow(2).mean(dim=(1, 3, 4))

    def batch_losses(self, batch):
        x0 = batch["x0"].to(self.device, non_blocking=True).float()  # [B, C, F, H, W]
        embeds = batch["prompt_embeds"].to(self.device, non_blocking=True).float()
        # noise levels and noise seeded by (step, rank, samples): a resumed run draws what the uninterrupted did
        seed = kd.stable_seed(self.cfg.training.seed, "ar", self.step, self.rank, *batch["index"].tolist())
        g = torch.Generator(self.device).manual_seed(seed)
        sigma = self.block_sigmas(x0.shape[0], x0.shape[2], g)
        frame_loss = self.flow_losses(x0, embeds, sigma, torch.randn(x0.shape, generator=g, device=self.device))
        # logged by t_list interval: entry k holds the timesteps in (t_{k+1}, t_k]
        bounds = self.t_values[1 : self.num_steps].flip(0)
        return frame_loss, self.num_steps - 1 - torch.bucketize(sigma * NUM_TRAIN_TIMESTEPS, bounds)

    def prepare_previews(self):
        super().prepare_previews()
        if self.clean_data and self.preview_indices:
            self.log("previews off: a clean-data cache pairs no initial noise with its samples")
            self.preview_indices = []

    def rollout_names(self):
        """None on clean data: no initial noise is paired with its samples, so a rollout has nothing to match."""
        return [] if self.clean_data else super().rollout_names()

    def eval_losses(self, index, states, x0, embeds, context):
        """The held-out flow-matching loss [K, F] at each t_list entry's sigma, the noise seeded by the sample
        (kd.py's eval measures the rest: the model's own K-step sampling, one pass and streaming)."""
        K = self.num_steps
        g = torch.Generator(self.device).manual_seed(kd.stable_seed(self.cfg.training.seed, "eval", index))
        eps = torch.randn(x0.shape, generator=g, device=self.device)[None].expand(K, -1, -1, -1, -1)
        sigma = self.sigmas[:K, None].expand(K, x0.shape[1])
        return self.flow_losses(x0[None].expand(K, -1, -1, -1, -1), embeds.expand(K, -1, -1), sigma, eps)


if __name__ == "__main__":
    run_cli(lambda argv: kd.main(argv, ARDiffusionTrainer), sys.argv[1:])
