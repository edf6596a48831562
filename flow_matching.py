"""Wan's flow matching, and where the student's timesteps fall on the teacher's grid.

Wan predicts the velocity v = eps - x0 of x_t = (1 - sigma) * x0 + sigma * eps, with timestep = 1000 * sigma.
The teacher integrates that ODE over a shifted sigma grid with Euler steps (the consumers' pairs) or UniPC (how
Wan's authors sample it); the student's `t_list` entries are matched to points of that grid once
(`teacher_grid`), and everything else reads that one match.
"""

import functools
from dataclasses import dataclass

import torch

from errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000


def shifted_sigmas(num_steps, shift):
    """The teacher's sigma grid [num_steps], 1 first, 0 excluded, float64 (Wan's and Self-Forcing's)."""
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def add_noise(x0, noise, sigma):
    """x_t = (1 - sigma) * x0 + sigma * noise."""
    return (1 - sigma) * x0 + sigma * noise


def x0_from_velocity(x_t, v, sigma):
    """The clean latent x0 = x_t - sigma * v that a velocity v predicts."""
    return x_t - sigma * v


def euler_step(x_t, v, sigma, sigma_next):
    """One ODE step dx/dsigma = v from sigma to sigma_next (< sigma)."""
    return x_t + (sigma_next - sigma) * v


class EulerSolver:
    """Euler steps over `sigmas` [N] (1 first, the final 0 implied), the model called at 1000 * sigma in float32
    (as diffusers' FlowMatchEulerDiscreteScheduler calls it)."""

    def __init__(self, sigmas):
        self.sigmas = [float(s) for s in sigmas] + [0.0]

    def timestep(self, i):
        return float(torch.tensor(self.sigmas[i] * NUM_TRAIN_TIMESTEPS, dtype=torch.float32))

    def step(self, i, x, v):
        return euler_step(x, v, self.sigmas[i], self.sigmas[i + 1])


# UniPC's settings as diffusers' UniPCMultistepScheduler names them, and its defaults, which Wan's checkpoints keep
UNIPC_DEFAULTS = {"solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
                  "disable_corrector": []}


class UniPCSolver:
    """UniPC over the same `sigmas`, run by diffusers' UniPCMultistepScheduler with flow sigmas exactly as
    WanPipeline runs it (its own float32 sigmas with the first moved 1e-6 below 1, the model called at the integer
    timestep int(1000 * sigma)). Each step's corrector refines the state the model was just called at; the state
    the model sees is the one WanPipeline hands its step callbacks, and the one the cache records."""

    def __init__(self, sigmas, settings):
        import numpy as np
        from diffusers import UniPCMultistepScheduler

        # flow_shift 1: the sigmas given are already shifted
        self.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 flow_shift=1.0, final_sigmas_type="zero", **settings)
        self.scheduler.set_timesteps(sigmas=np.asarray([float(s) for s in sigmas], dtype=np.float64))
        # On fine grids the first two integer timesteps coincide, and the scheduler would take the second for its
        # first step; WanPipeline's grids (tens of steps) never do, so this changes nothing there.
        self.scheduler.set_begin_index(0)

    def timestep(self, i):
        return float(self.scheduler.timesteps[i])

    def step(self, i, x, v):
        return self.scheduler.step(v, self.scheduler.timesteps[i], x, return_dict=False)[0]


def ode_solver(name, sigmas, settings=None):
    """A fresh solver (they keep history) over `sigmas`: "euler", or "unipc" with UniPC `settings`."""
    if name == "euler":
        return EulerSolver(sigmas)
    return UniPCSolver(sigmas, settings if settings is not None else UNIPC_DEFAULTS)


@dataclass(frozen=True)
class TeacherGrid:
    """The teacher's grid and the student's place on it.

    sigmas: the teacher's N sigmas (1 first); matched: the grid step of each t_list entry but the final 0 [K];
    recorded: the steps whose pre-step state the cache keeps (the matched ones, all N, or method.recorded_steps).
    """

    sigmas: tuple
    matched: tuple
    recorded: tuple

    @property
    def timesteps(self):
        """The timesteps the cache records, one per kept state, 0 last, as float32 values."""
        grid = [self.sigmas[i] * NUM_TRAIN_TIMESTEPS for i in self.recorded]
        return torch.tensor(grid + [0.0], dtype=torch.float32).tolist()

    @property
    def positions(self):
        """Position on a cached file's state axis of each t_list entry but the final 0 [K]."""
        return [self.recorded.index(i) for i in self.matched]

    @property
    def entry_positions(self):
        """Position on a cached file's state axis of every t_list entry [K + 1]: x0 follows the recorded states."""
        return self.positions + [len(self.recorded)]

    @property
    def student_timesteps(self):
        """The matched grid timestep of each t_list entry but the final 0 [K], as the cache records it (float32
        values: 1000, 937.5, 833.33.., 625 for [999, 937, 833, 624, 0] on 48 steps at shift 5)."""
        timesteps = self.timesteps
        return [timesteps[p] for p in self.positions]

    @property
    def student_sigmas(self):
        """The matched sigma of each t_list entry but the final 0 [K], from the recorded float32 timesteps."""
        return [t / NUM_TRAIN_TIMESTEPS for t in self.student_timesteps]


def teacher_grid(cfg):
    """cfg's TeacherGrid (ConfigError for a t_list entry beyond method.t_list_tolerance from the grid, or at a
    step that method.recorded_steps leaves out)."""
    m = cfg.method
    recorded_steps = m.get("recorded_steps")
    return _teacher_grid(tuple(m.t_list), m.teacher_inference_steps, cfg.pipeline.flow_shift,
                         m.t_list_tolerance, m.keep_full_trajectory,
                         tuple(recorded_steps) if recorded_steps is not None else None)


@functools.lru_cache(maxsize=64)  # validation, the cache and the trainer all read the one match of a config
def _teacher_grid(t_list, num_steps, shift, tolerance, keep_full_trajectory, recorded_steps=None):
    matched = tuple(match_t_list(t_list, num_steps, shift, tolerance))
    sigmas = tuple(shifted_sigmas(num_steps, shift).tolist())
    for t, step in zip(t_list, matched):
        if recorded_steps is not None and step not in recorded_steps:
            held = ", ".join(f"{sigmas[s] * NUM_TRAIN_TIMESTEPS:.2f} (step {s})" for s in recorded_steps)
            raise ConfigError(f"method.t_list entry {t} is step {step} of the teacher's grid ({num_steps} steps, "
                              f"flow_shift {shift}), which the cache does not record; method.recorded_steps "
                              f"holds {held}")
    recorded = tuple(range(num_steps)) if keep_full_trajectory else recorded_steps or matched
    return TeacherGrid(sigmas, matched, recorded)


def conditioning_timesteps(cfg):
    """The timestep the student is conditioned on at each t_list entry but the final 0 [K]: its matched grid
    timestep, or with method.student_timesteps: t_list the value as written (the seed's)."""
    if cfg.method.student_timesteps == "t_list":
        return [float(t) for t in cfg.method.t_list[:-1]]
    return teacher_grid(cfg).student_timesteps


def match_t_list(t_list, num_steps, shift, tolerance):
    """The teacher-grid step of each t_list entry but the final 0 (ConfigError beyond `tolerance`, or for two
    entries on one step: the cache would record the state once and list its timestep twice)."""
    grid = shifted_sigmas(num_steps, shift) * NUM_TRAIN_TIMESTEPS
    indices = []
    for t in t_list[:-1]:
        distance = (grid - t).abs()
        i = int(distance.argmin())
        if distance[i] > tolerance:
            near = sorted(range(num_steps), key=lambda j: float(distance[j]))[:3]
            values = ", ".join(f"{float(grid[j]):.2f} (step {j})" for j in sorted(near))
            raise ConfigError(
                f"method.t_list entry {t} is {float(distance[i]):.2f} timesteps from the teacher's grid "
                f"({num_steps} steps, flow_shift {shift}); nearest grid values: {values}; "
                f"tolerance is method.t_list_tolerance={tolerance}"
            )
        if i in indices:
            raise ConfigError(
                f"method.t_list entries {t_list[indices.index(i)]} and {t} both match step {i} of the teacher's "
                f"grid ({float(grid[i]):.2f}; {num_steps} steps, flow_shift {shift}); give each entry its own "
                f"step, or lower method.t_list_tolerance={tolerance}"
            )
        indices.append(i)
    return indices
