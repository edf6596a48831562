"""Causal KD: a block-causal student learns each block of frames from its own noise level.

    torchrun --standalone --nproc_per_node=2 kd_causal.py configs/tiny_causal.yaml
    torchrun --nproc_per_node=8 kd_causal.py configs/wan_causal.yaml

Everything (cache, student, checkpoints, eval, export) is kd.py's; only the timestep sampler differs: every
block of `method.num_frames_per_block` latent frames draws its own t_list entry (the last block may be
shorter). As in Self-Forcing's and CausVid's ODE regression, the draw is over all K + 1 entries: a block that
draws the final one is the clean x0, the context Self-Forcing's inference gives the blocks after it, and kd.py
gives it no loss (method.clean_context=false: the K noisy entries only, the seed's sampler). On a causal ODE
cache (an AR teacher's pairs) every block already has the clean data before it as context (teacher forcing),
so the draw is over the K noisy entries.
"""

import sys

import torch

import kd
from errors import ConfigError, run_cli


class CausalKDTrainer(kd.KDTrainer):
    """KDTrainer whose timestep sampler draws one t_list entry per block of frames."""

    def sample_step_indices(self, generator, batch_size, num_frames):
        # the K noisy entries, and the clean x0 as a (K + 1)-th unless method.clean_context is off; a given
        # first frame is a block of its own (kd.py sets its entry)
        m = self.cfg.method
        block, entries = m.num_frames_per_block, self.num_steps + (m.clean_context and not self.causal_ode)
        first = int(m.first_frame_given)
        per_block = torch.randint(entries, (batch_size, first - (first - num_frames) // block), generator=generator)
        return torch.cat([per_block[:, :first], per_block[:, first:].repeat_interleave(block, dim=1)],
                         dim=1)[:, :num_frames]  # [B, F]


def check_text_to_video_causal(cfg, script, trains):
    """ConfigError unless cfg trains a block-causal text-to-video model, as `script` (which `trains` it) needs."""
    if cfg.method.first_frame_given:
        raise ConfigError(f"method.first_frame_given: {script} trains text-to-video only (image-to-video "
                          "students: kd.py or kd_causal.py)")
    if cfg.models.student.attention != "block_causal":
        raise ConfigError(f"{script} trains {trains}: set models.student.attention: block_causal")


if __name__ == "__main__":
    run_cli(lambda argv: kd.main(argv, CausalKDTrainer), sys.argv[1:])
