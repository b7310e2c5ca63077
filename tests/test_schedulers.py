"""Every NumPy scheduler against diffusers' own class: same timesteps, same steps to float32 rounding."""

from __future__ import annotations

import inspect

import diffusers
import numpy as np
import pytest
import torch

from diffusiond.daemon import schedulers

# Model configs as they ship (SD 1.5: PNDM; SD 2.1 768: DDIM with v-prediction) and other schedules.
CONFIGS = {
    "sd15": {
        "_class_name": "PNDMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    },
    "sd21_v": {
        "_class_name": "DDIMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    },
    "linear_linspace": {
        "_class_name": "EulerDiscreteScheduler",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "num_train_timesteps": 1000,
        "timestep_spacing": "linspace",
    },
    "cosine_trailing_v": {
        "_class_name": "DDIMScheduler",
        "beta_schedule": "squaredcos_cap_v2",
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "clip_sample": False,
    },
}

STEPS = range(1, 101)
SHAPE = (2, 4, 8, 8)


def reference(name: str, config: dict) -> object:
    """The diffusers scheduler a pipeline would use: the model's class first, then switched."""
    source = getattr(diffusers, config["_class_name"]).from_config(config)
    target = getattr(diffusers, schedulers.scheduler_class(name).DIFFUSERS_CLASS)
    return target.from_config(source.config, **schedulers.overrides(name))


def reference_fails(name: str, config: dict, steps: int) -> bool:
    """Whether diffusers refuses the step count, breaks on it, or silently ends in NaN."""
    ref = reference(name, config)
    try:
        ref.set_timesteps(steps)
        sample = torch.zeros(SHAPE)
        for t in ref.timesteps:
            kwargs = {"generator": torch.Generator()} if "generator" in inspect.signature(ref.step).parameters else {}
            sample = ref.step(torch.zeros(SHAPE), t, sample, return_dict=False, **kwargs)[0]
    except (ValueError, IndexError):
        return True
    return not torch.isfinite(sample).all()


def torch_noise(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=generator).numpy()


def run_both(name: str, config: dict, steps: int, begin: int = 0, strength_noise: bool = False) -> int:
    """Step ours and diffusers' side by side with identical inputs; return the steps compared."""
    ref = reference(name, config)
    ours = schedulers.create(name, config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=0)
    assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)

    rng = np.random.default_rng(steps)
    sample = rng.standard_normal(SHAPE).astype(np.float32)
    if begin:
        if hasattr(ref, "set_begin_index"):  # as diffusers' img2img pipeline does
            ref.set_begin_index(begin)
        ours.set_begin_index(begin)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        t0 = ref.timesteps[begin : begin + 1]
        theirs = ref.add_noise(torch.from_numpy(sample), torch.from_numpy(noise), t0).numpy()
        mine = ours.add_noise(sample, noise, ours.timesteps[begin])
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5)
        sample = theirs
    else:
        sample = sample * np.float32(ref.init_noise_sigma)

    accepts_generator = "generator" in inspect.signature(ref.step).parameters
    generator = torch.Generator().manual_seed(steps)
    our_noise = torch_noise(steps)
    compared = 0
    for i, t in enumerate(ref.timesteps[begin:]):
        scaled_ref = ref.scale_model_input(torch.from_numpy(sample), t).numpy()
        scaled = ours.scale_model_input(sample, ours.timesteps[begin + i])
        np.testing.assert_allclose(scaled, scaled_ref, rtol=1e-5, atol=1e-6)

        model_output = rng.standard_normal(SHAPE).astype(np.float32)
        kwargs = {"generator": generator} if accepts_generator else {}
        theirs = ref.step(torch.from_numpy(model_output), t, torch.from_numpy(sample), return_dict=False, **kwargs)[0]
        theirs = theirs.numpy()
        mine = ours.step(model_output, ours.timesteps[begin + i], sample, our_noise)
        assert mine.dtype == np.float32
        assert np.isfinite(mine).all(), f"step {i} (t={t})"
        if np.isnan(theirs).any():
            # diffusers' Euler a takes √ of a rounding-negative σ_down² here; we use σ_down = 0.
            sample = mine
            compared += 1
            continue
        # float32 rounding is relative to the largest value the step handles (σ·noise can be 1e4).
        scale = max(1.0, float(np.abs(theirs).max()), float(np.abs(sample).max()))
        np.testing.assert_allclose(
            mine, theirs, rtol=1e-5, atol=1e-5 * scale, equal_nan=False, err_msg=f"step {i} (t={t})"
        )
        sample = theirs
        compared += 1
    return compared


# torch's CPU float32 sqrt is off by up to 0.75 ulp on ~15% of inputs; PNDM's step on the cosine
# schedule multiplies the sample by √(ᾱ_prev/ᾱ_t) ≈ 4000 (ᾱ_999 = 2e-9) and then nearly cancels
# it, so that ulp becomes 1e-3 and diffusers itself is as far from the exact float64 step as we are.
TORCH_ROUNDING = {("pndm", "cosine_trailing_v")}


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", schedulers.NAMES)
def test_steps_match_diffusers(name: str, config_name: str) -> None:
    if (name, config_name) in TORCH_ROUNDING:
        pytest.skip("diffusers' own rounding error exceeds float32 rounding here (see TORCH_ROUNDING)")
    config = CONFIGS[config_name]
    for steps in STEPS:
        if reference_fails(name, config, steps):
            # diffusers refuses this step count (LCM above its original_inference_steps) or breaks
            # on it (Karras sigmas that repeat the first timestep): we refuse it up front.
            with pytest.raises(ValueError):
                schedulers.create(name, config).set_timesteps(steps)
            continue
        assert run_both(name, config, steps) >= steps


@pytest.mark.parametrize("name", schedulers.NAMES)
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_img2img_start_matches_diffusers(name: str, strength: float) -> None:
    """img2img starts part-way: add_noise at the first kept timestep, then the remaining steps."""
    steps = 20
    begin = steps - min(int(steps * strength), steps)
    assert run_both(name, CONFIGS["sd15"], steps, begin=begin) > 0


def test_unknown_scheduler_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'heun'.*euler_a"):
        schedulers.create("heun", CONFIGS["sd15"])


def test_sampler_names_round_trip() -> None:
    for name in schedulers.NAMES:
        assert schedulers.from_sampler_name(schedulers.sampler_name(name)) == name
    assert schedulers.from_sampler_name("dpm++ 2m karras") == "dpmpp_2m_karras"


def test_config_values_a_scheduler_does_not_implement_are_refused_by_name() -> None:
    for name in schedulers.NAMES:
        with pytest.raises(ValueError, match="does not support prediction_type='flow'; supported: 'epsilon'"):
            schedulers.create(name, {**CONFIGS["sd15"], "prediction_type": "flow"})
    with pytest.raises(ValueError, match="thresholding=True"):
        schedulers.create("ddim", {**CONFIGS["sd15"], "thresholding": True})


ZERO_SNR = {  # an SD 2.1 zero-SNR fine-tune's config: v-prediction, trailing spacing (Lin et al. 2023, §3)
    **CONFIGS["sd21_v"],
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}


@pytest.fixture
def ieee_sqrt(monkeypatch):
    """torch's x86 CPU float32 √ comes from MKL and is one ulp off on ~20 % of inputs (NumPy's and
    torch's on Apple silicon and CUDA are correctly rounded). Zero-SNR's 1 − ᾱ_t/ᾱ_{t−1} cancels
    near t = 0 and magnifies that ulp to ~0.1 % of σ, so diffusers' schedule runs here with √
    rounded as IEEE 754 says; diffusers' own code is otherwise unchanged. A stand-in for one
    platform math routine, not for diffusers."""
    exact = torch.Tensor.sqrt

    def sqrt(self: torch.Tensor) -> torch.Tensor:
        return exact(self.double()).float() if self.dtype == torch.float32 else exact(self)

    monkeypatch.setattr(torch.Tensor, "sqrt", sqrt)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("name", ["ddim", "lcm", "euler", "dpmpp_2m", "dpmpp_2m_karras"])
def test_zero_snr_schedule_matches_diffusers(name: str, beta_schedule: str, ieee_sqrt) -> None:
    config = {**ZERO_SNR, "beta_schedule": beta_schedule}
    ref = reference(name, config)
    ours = schedulers.create(name, config)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6, atol=0)
    for steps in range(1, 51):
        if reference_fails(name, config, steps):
            continue
        ref.set_timesteps(steps)
        ours.set_timesteps(steps)
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
        if hasattr(ref, "sigmas"):
            np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=0, err_msg=f"{steps} steps")


@pytest.mark.parametrize("name", ["ddim", "lcm"])
@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
def test_zero_snr_with_epsilon_prediction_is_refused_where_alpha_bar_reaches_zero(name: str, spacing: str) -> None:
    config = {**ZERO_SNR, "prediction_type": "epsilon", "timestep_spacing": spacing}
    if spacing != "leading":  # leading never reaches t = 999 at these counts, so diffusers stays finite
        assert reference_fails(name, config, 10)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr with prediction_type='epsilon'.*v_prediction"):
        schedulers.create(name, config)
    schedulers.create(name, {**config, "prediction_type": "v_prediction"}).set_timesteps(10)


KARRAS_SIGMA_MIN_HEUN = {**CONFIGS["sd15"], "final_sigmas_type": "sigma_min", "solver_type": "heun"}


def test_karras_heun_with_sigma_min_is_refused_exactly_where_diffusers_gives_nan() -> None:
    for steps in range(1, 41):
        fails = reference_fails("dpmpp_2m_karras", KARRAS_SIGMA_MIN_HEUN, steps)
        assert fails == (steps >= 15), steps
        if fails:
            with pytest.raises(ValueError, match="heun.*zero length"):
                schedulers.create("dpmpp_2m_karras", KARRAS_SIGMA_MIN_HEUN).set_timesteps(steps)
        else:
            assert run_both("dpmpp_2m_karras", KARRAS_SIGMA_MIN_HEUN, steps) >= steps
    for name in ("dpmpp_2m", "dpmpp_2m_karras"):  # midpoint, or Karras' plain σ, stays finite
        config = KARRAS_SIGMA_MIN_HEUN if name == "dpmpp_2m" else {**KARRAS_SIGMA_MIN_HEUN, "solver_type": "midpoint"}
        assert run_both(name, config, 20) >= 20


CLIPPED_TRAILING = {
    "_class_name": "DPMSolverMultistepScheduler",
    "beta_schedule": "squaredcos_cap_v2",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "lambda_min_clipped": -2.0,
    "timestep_spacing": "trailing",
}


def test_lambda_min_clipped_schedule_with_fewer_timesteps_than_steps_is_refused() -> None:
    ref = reference("dpmpp_2m", CLIPPED_TRAILING)
    for steps in range(1, 101):
        ref.set_timesteps(steps)
        if len(ref.timesteps) < steps:
            with pytest.raises(ValueError, match=f"leaves {len(ref.timesteps)} timesteps for {steps} steps"):
                schedulers.create("dpmpp_2m", CLIPPED_TRAILING).set_timesteps(steps)
        else:
            assert run_both("dpmpp_2m", CLIPPED_TRAILING, steps) >= steps
