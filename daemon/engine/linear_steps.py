"""The denoising loop as a table of coefficients, so a runtime can run it on the device.

Every deterministic scheduler here (DPM++ 2M, Euler, DDIM without clipping, PNDM) is linear: each
step's output is a fixed linear combination of the sample, the model output and what the scheduler
remembers of earlier steps, with coefficients that depend only on the step. So the latents after
``k`` steps, and the UNet's input at step ``k``, are linear combinations of the *atoms*

    a_0 = the initial latents,  a_{j+1} = the guided model output of step j.

:func:`trace` finds those combinations by running the NumPy scheduler itself — the one the host
loop uses, unchanged — on coefficient vectors instead of latents: ``e_0`` for the initial latents
and ``e_{j+1}`` as the model output of step ``j``. The scheduler code lives once; the device only
evaluates ``row @ atoms``, which needs no host round trip and has the same shapes at every step
(CUDA graphs). A scheduler that draws noise (Euler a, LCM) or is not linear (DDIM's clipping) is
refused: the trace checks itself against the real scheduler on a probe and the pipeline falls
back to the host loop.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from .schedulers import Scheduler


@dataclass(frozen=True)
class LinearPlan:
    """Row ``k`` of ``inputs``: the UNet input of step ``k``; row ``k`` of ``latents``: the latents
    after ``k`` steps — both over the atoms (initial latents, then each step's guided output),
    zero where an atom does not exist yet."""

    timesteps: np.ndarray  # (n,) as the UNet is given them
    inputs: np.ndarray  # (n, n + 1) float32
    latents: np.ndarray  # (n + 1, n + 1) float32

    @property
    def steps(self) -> int:
        return len(self.timesteps)


class _DrawsNoise(Exception):
    pass


def _no_noise(shape: tuple[int, ...]) -> np.ndarray:
    raise _DrawsNoise


def trace(scheduler: Scheduler, timesteps: np.ndarray) -> LinearPlan | None:
    """The plan of a scheduler whose ``set_timesteps`` (and img2img's ``set_begin_index``) has run;
    None when it draws noise or is not linear. The scheduler itself is left untouched."""
    n = len(timesteps)
    atoms = np.eye(n + 1, dtype=np.float32)
    tracer = copy.deepcopy(scheduler)
    latents, inputs, rows = atoms[0], [], [atoms[0]]
    try:
        for k, t in enumerate(timesteps):
            inputs.append(np.asarray(tracer.scale_model_input(latents, t), dtype=np.float32))
            latents = np.asarray(tracer.step(atoms[k + 1], t, latents, _no_noise), dtype=np.float32)
            rows.append(latents)
    except _DrawsNoise:
        return None
    plan = LinearPlan(np.asarray(timesteps), np.stack(inputs), np.stack(rows))
    return plan if _agrees(plan, scheduler) else None


def _agrees(plan: LinearPlan, scheduler: Scheduler) -> bool:
    """Whether the plan reproduces the real scheduler on random latents and outputs large enough
    to trip any clipping: linearity is checked, not assumed."""
    rng = np.random.default_rng(0)
    probe = copy.deepcopy(scheduler)
    atoms = [rng.standard_normal((1, 4, 2, 2)).astype(np.float32) * 10]
    pairs = []
    latents = atoms[0]
    for row, t in zip(plan.inputs, plan.timesteps):
        pairs.append((row, probe.scale_model_input(latents, t)))
        atoms.append(rng.standard_normal(latents.shape).astype(np.float32) * 10)
        latents = probe.step(atoms[-1], t, latents, _no_noise)
    pairs.append((plan.latents[-1], latents))
    stacked = np.stack(atoms)
    for row, expected in pairs:
        scale = float(np.abs(expected).max()) + 1e-6
        if not np.allclose(combine(row, stacked), expected, rtol=1e-4, atol=1e-4 * scale):
            return False
    return True


def combine(row: np.ndarray, atoms: np.ndarray) -> np.ndarray:
    """``row @ atoms`` over the leading axis: the latents (or UNet input) a plan row stands for."""
    return np.tensordot(row[: len(atoms)], atoms, axes=1).astype(np.float32)
