"""NumPy schedulers, one per file, each with diffusers' `set_timesteps` / `step` shape.

Every scheduler takes a diffusers scheduler config (the model's scheduler_config.json) and works
on float32 NumPy arrays, so the same loop runs on every runtime. Each is tested step for step
against diffusers' own class (the `*_swift` flavours against the rules of Apple's Swift source).

The contract each class keeps:

* ``DIFFUSERS_CLASS`` — the diffusers class it reproduces (or, for the ``*_swift`` flavours that
  reproduce Apple's Swift pipeline instead, the class it departs from); ``DEFAULTS`` — that class's config
  defaults (the keys it reads and their values when the config leaves them out).
* ``init_noise_sigma`` and ``timesteps`` (after ``set_timesteps``).
* ``set_timesteps(n)``; ``set_begin_index(i)`` before img2img's ``add_noise``.
* ``scale_model_input(sample, t)``; ``step(model_output, t, sample, noise)`` → previous sample,
  where ``noise(shape)`` draws standard normal float32 noise for the steps that need it.
* ``add_noise(original, noise, t)`` for img2img.

Self-contained on purpose. Each file reads top to bottom like its diffusers class: its
``DEFAULTS`` (that class's constructor defaults), what it refuses (``SUPPORTED``), then
``set_timesteps`` and ``step`` with the paper or formula cited. The ``DEFAULTS`` and ``SUPPORTED``
blocks look alike from file to file, but their values are each class's own (LCM's and Swift's beta
range, DDIM's ``clip_sample``, PNDM's missing ``rescale_betas_zero_snr``), and a shared base would
hide what a scheduler runs with behind an import; so they stay per file, and
tests/test_schedulers.py holds every ``DEFAULTS`` to diffusers' constructor so no copy drifts.
What is about no one scheduler lives once: refusing an unimplemented config value
(:func:`check_supported`), the training betas (betas.py), σ bookkeeping (sigmas.py), Swift's
float32 arithmetic (swift.py), and taking a model config's keys (:func:`create`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the registry's names are read by command lines that must start without NumPy
    import numpy as np

Noise = Callable[[tuple[int, ...]], "np.ndarray"]


class Scheduler(Protocol):
    DIFFUSERS_CLASS: str
    DEFAULTS: Mapping[str, Any]
    init_noise_sigma: float
    timesteps: np.ndarray

    def __init__(self, config: Mapping[str, Any]) -> None: ...

    def set_timesteps(self, num_inference_steps: int) -> None: ...

    def set_begin_index(self, begin_index: int) -> None: ...

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray: ...

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: Noise | None = None
    ) -> np.ndarray: ...

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray: ...


def check_supported(owner: str, config: Mapping[str, Any], supported: Mapping[str, Iterable[Any]]) -> None:
    """Refuse config values a scheduler does not implement rather than silently stepping differently."""
    for key, values in supported.items():
        values = tuple(values)
        if config[key] not in values:
            raise ValueError(
                f"{owner} does not support {key}={config[key]!r}; supported: {', '.join(map(repr, values))}"
            )


# name -> (module, class, config overrides, the sampler name written into PNG infotext)
_REGISTRY: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "pndm": ("pndm", "PNDM", {}, "PNDM"),
    "dpmpp_2m": (
        "dpmpp_2m",
        "DPMSolverPP2M",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        "DPM++ 2M",
    ),
    "dpmpp_2m_karras": (
        "dpmpp_2m",
        "DPMSolverPP2M",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "euler": ("euler", "Euler", {}, "Euler"),
    "euler_a": ("euler_ancestral", "EulerAncestral", {}, "Euler a"),
    "ddim": ("ddim", "DDIM", {}, "DDIM"),
    "lcm": ("lcm", "LCM", {}, "LCM"),
    # Apple's Swift pipeline (Diffusers for Mac), step for step: its image for a seed, not diffusers'.
    "dpmpp_2m_swift": ("dpmpp_2m_swift", "DPMSolverPP2MSwift", {}, "DPM++ 2M Swift"),
    "pndm_swift": ("pndm_swift", "PNDMSwift", {}, "PNDM Swift"),
}

NAMES: tuple[str, ...] = tuple(_REGISTRY)
# The schedulers that reproduce their DIFFUSERS_CLASS; the Swift ones depart from it on purpose.
DIFFUSERS_NAMES: tuple[str, ...] = tuple(name for name in NAMES if not name.endswith("_swift"))


def sampler_name(name: str) -> str:
    """The infotext "Sampler:" value of a scheduler (as other Stable Diffusion tools write it)."""
    return _REGISTRY[_check(name)][3]


def from_sampler_name(sampler: str) -> str:
    for name, entry in _REGISTRY.items():
        if entry[3].lower() == sampler.strip().lower() or name == sampler.strip().lower():
            return name
    raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(e[3] for e in _REGISTRY.values())}")


def scheduler_class(name: str) -> type[Scheduler]:
    module, cls, _, _ = _REGISTRY[_check(name)]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def overrides(name: str) -> dict[str, Any]:
    return dict(_REGISTRY[_check(name)][2])


def _check(name: str) -> str:
    if name not in _REGISTRY:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(NAMES)}")
    return name


def create(name: str, model_config: Mapping[str, Any]) -> Scheduler:
    """A scheduler for a model, configured as diffusers' ``Cls.from_config(pipe.scheduler.config)``.

    Only the keys the model's config states carry over; the rest take this scheduler's own
    defaults, as in diffusers (SD 1.5 states no ``timestep_spacing``, so Euler uses its own).
    """
    cls = scheduler_class(name)
    merged = {**model_config, **overrides(name)}
    return cls({key: merged[key] for key in cls.DEFAULTS if key in merged})
