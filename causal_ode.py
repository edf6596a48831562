"""Causal ODE regression (Causal Forcing's stage 2a): a block-causal student on an AR teacher's pairs.

    torchrun --standalone --nproc_per_node=2 causal_ode.py configs/tiny_causal_ode.yaml   # the tiny demo, on CPU
    torchrun --nproc_per_node=8 causal_ode.py configs/wan_causal_ode.yaml

The cache (generate_cache.py with an AR teacher and method.context_cache; completed first if it is not) holds,
per sample, the AR teacher's states at t_list, its x0 and the clean data latents its blocks followed. Training is
kd_causal.py's with that context: every block draws one of the K noisy entries and sees the clean data before it
(teacher forcing, as its teacher did), and the loss is the MSE of its x0 prediction against the generated x0.

The pairs judge the student teacher-forced; it will be used streaming, each block after its own outputs. So the
eval adds the AR teacher doing that: at start-up it generates each held-out sample free-running (every block
after its own earlier x0) in its full grid and in the student's K steps, and each eval logs
rollout_error_streaming_ar, the student's streaming sampling (deterministic Euler steps) against the former,
beside the untrained student's and the teacher's own K steps' (rollout_error_teacher_streaming).
"""

import sys

import torch
import torch.distributed as dist

import kd
import kd_causal
from ar_teacher import free_running_samples
from errors import run_cli
from eval_references import teacher_inputs
from teacher import teacher_solver


class CausalODETrainer(kd_causal.CausalKDTrainer):
    """CausalKDTrainer on causal ODE pairs, its streaming sampling also judged against the AR teacher's."""

    causal_ode = True

    def __init__(self, cfg, rank, world_size, device):
        super().__init__(cfg, rank, world_size, device)
        kd_causal.check_text_to_video_causal(cfg, "causal_ode.py", "a causal student")
        self.ar_streaming = {}  # {eval index: the AR teacher's free-running x0 over its full grid [C, F, H, W]}

    def prepare_teacher_reference(self):
        """kd.py's references, then the AR teacher's free-running samples of this rank's eval samples (every
        start: they are the streaming rollout's target) and, once per run, its own K steps' error against them."""
        super().prepare_teacher_reference()
        m = self.cfg.method
        if self.cfg.models.teacher is None or not self.eval_indices:
            return  # a complete cache without its teacher: the pairs' references only
        shares = self.rank_share(self.eval_indices)
        samples, negative = teacher_inputs(self.cfg, sorted({i for i, _ in shares}), self.load_eval_sample,
                                              self.meta["max_sequence_length"], self.device)
        grids = [torch.tensor(self.grid.sigmas, dtype=torch.float64), self.sigmas[: self.num_steps].double().cpu()]
        solver = (m.teacher_solver, teacher_solver(self.cfg)["teacher_solver_settings"])
        x0 = free_running_samples(self.cfg.models.teacher.init_from, samples, negative, grids,
                                  m.teacher_guidance_scale, *solver, self.device)  # {index: [full, K steps]}
        self.ar_streaming = {index: full for index, (full, _) in x0.items()}
        if "teacher_streaming" not in self.references:
            total = torch.zeros((), device=self.device, dtype=torch.float64)
            for index, weight in shares:
                full, k_step = x0[index]
                total += weight * (k_step - full).pow(2).mean().double()
            dist.all_reduce(total)
            self.references["teacher_streaming"] = total.item() / len(self.eval_indices)

    def rollout_names(self):
        return super().rollout_names() + (["rollout_error_streaming_ar"] if self.ar_streaming else [])

    def rollout_errors(self, index, noise, embeds, x0):
        errors = super().rollout_errors(index, noise, embeds, x0)
        if self.ar_streaming:
            sample = kd.streaming_sample(self.model, noise, embeds, self.t_values, self.sigmas,
                                         self.cfg.method.num_frames_per_block)[0]
            errors.append((sample - self.ar_streaming[index]).pow(2).mean())
        return errors


if __name__ == "__main__":
    run_cli(lambda argv: kd.main(argv, CausalODETrainer), sys.argv[1:])
