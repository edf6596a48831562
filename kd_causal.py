"""Causal KD: a block-causal student learns each block of frames from its own noise level.

    torchrun --standalone --nproc_per_node=2 kd_causal.py configs/tiny_causal.yaml
    torchrun --nproc_per_node=8 kd_causal.py configs/wan_causal.yaml

Everything (cache, student, checkpoints, eval, export) is kd.py's; only the timestep sampler differs: every
block of `method.num_frames_per_block` latent frames draws its own step index (the last block may be shorter).
"""

import sys

import torch

import kd
from errors import run_cli


class CausalKDTrainer(kd.KDTrainer):
    """KDTrainer whose timestep sampler draws one step index per block of frames."""

    def sample_step_indices(self, generator, batch_size, num_frames):
        block = self.cfg.method.num_frames_per_block
        per_block = torch.randint(self.num_steps, (batch_size, -(-num_frames // block)), generator=generator)
        return per_block.repeat_interleave(block, dim=1)[:, :num_frames]  # [B, F]


if __name__ == "__main__":
    run_cli(lambda argv: kd.main(argv, CausalKDTrainer), sys.argv[1:])
