"""Every NumPy scheduler against diffusers' own class: same timesteps, same steps to float32 rounding."""

from __future__ import annotations

import inspect
import math

import diffusers
import numpy as np
import pytest
import torch

from diffusiond.clients.infotext import job_settings, parse_infotext
from diffusiond.daemon.engine import schedulers
from diffusiond.daemon.engine.pipeline import Request
from diffusiond.daemon.engine.png import infotext

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

# Every count up to 12, where spacing and rounding rules differ most, then a spread to the
# 100-step limit with the usual defaults (20, 25, 30, 50) and LCM's 50-step boundary on both sides.
# (The full 1–100 sweep passed when each scheduler was written; it costs seven times as much.)
STEPS = [*range(1, 13), 15, 20, 25, 30, 33, 40, 49, 50, 51, 64, 75, 99, 100]
SHAPE = (2, 4, 8, 8)


def reference(name: str, config: dict) -> object:
    """The diffusers scheduler a pipeline would use: the model's class first, then switched."""
    source = getattr(diffusers, config["_class_name"]).from_config(config)
    target = getattr(diffusers, schedulers.scheduler_class(name).DIFFUSERS_CLASS)
    return target.from_config(source.config, **schedulers.overrides(name))


def reference_sample(name: str, config: dict, steps: int) -> torch.Tensor:
    """diffusers' last sample from zero latents and zero model outputs: only the schedule's own arithmetic."""
    ref = reference(name, config)
    ref.set_timesteps(steps)
    sample = torch.zeros(SHAPE)
    for t in ref.timesteps:
        kwargs = {"generator": torch.Generator()} if "generator" in inspect.signature(ref.step).parameters else {}
        sample = ref.step(torch.zeros(SHAPE), t, sample, return_dict=False, **kwargs)[0]
    return sample


def reference_fails(name: str, config: dict, steps: int) -> bool:
    """Whether diffusers refuses the step count or breaks on it."""
    try:
        reference_sample(name, config, steps)
    except (ValueError, IndexError):
        return True
    return False


def reference_ends_in_nan(name: str, config: dict, steps: int) -> bool:
    return not torch.isfinite(reference_sample(name, config, steps)).all()


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
@pytest.mark.parametrize("name", schedulers.DIFFUSERS_NAMES)
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


@pytest.mark.parametrize("name", schedulers.DIFFUSERS_NAMES)
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


@pytest.mark.parametrize("name", schedulers.DIFFUSERS_NAMES)
def test_each_schedulers_defaults_are_its_diffusers_class_defaults(name: str) -> None:
    """Each file spells out its class's defaults (schedulers/__init__.py says why); here they are
    held to diffusers' constructor, key for key, so a copy cannot drift."""
    cls = schedulers.scheduler_class(name)
    parameters = inspect.signature(getattr(diffusers, cls.DIFFUSERS_CLASS).__init__).parameters
    assert {key: parameters[key].default for key in cls.DEFAULTS if key in parameters} == dict(cls.DEFAULTS)


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
        assert reference_ends_in_nan(name, config, 10)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr with prediction_type='epsilon'.*v_prediction"):
        schedulers.create(name, config)
    schedulers.create(name, {**config, "prediction_type": "v_prediction"}).set_timesteps(10)


KARRAS_SIGMA_MIN_HEUN = {**CONFIGS["sd15"], "final_sigmas_type": "sigma_min", "solver_type": "heun"}


def test_karras_heun_with_sigma_min_is_refused_exactly_where_diffusers_gives_nan() -> None:
    for steps in range(1, 41):
        fails = reference_ends_in_nan("dpmpp_2m_karras", KARRAS_SIGMA_MIN_HEUN, steps)
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


# Diffusers for Mac: Apple's Swift pipeline, apple/ml-stable-diffusion at e12202c1 (2025-07-03),
# swift/StableDiffusion/pipeline/{DPMSolverMultistepScheduler,Scheduler,StableDiffusionPipeline}.swift.
# The references below are written from those Swift formulas, scalar by scalar in float32.


def swift_linspace(start: float, end: float, count: int) -> list[np.float32]:
    """Scheduler.swift's linspace: scale = (end − start)/Float(count − 1); Float(i)·scale + start."""
    scale = np.float32(np.float32(end) - np.float32(start)) / np.float32(count - 1)
    return [np.float32(np.float32(i) * scale) + np.float32(start) for i in range(count)]


def swift_round(value: np.float32) -> int:
    """Swift's round(): to nearest, halves away from zero (v + 0.5 is exact in float64 here)."""
    return math.floor(float(value) + 0.5)


def swift_alphas_cumprod(config: dict) -> np.ndarray:
    """.scaledLinear betas, then alphasCumProd[i] *= alphasCumProd[i − 1] in Float."""
    half = np.float32(0.5)
    roots = swift_linspace(np.float32(config["beta_start"]) ** half, np.float32(config["beta_end"]) ** half, 1000)
    product, result = np.float32(1), []
    for root in roots:
        product = np.float32(product * (np.float32(1) - root * root))
        result.append(product)
    return np.array(result, dtype=np.float32)


def swift_dpm_timesteps(steps: int) -> list[int]:
    """linspace(0, Float(trainStepCount − 1), stepCount + 1).dropFirst().reversed().map { Int(round($0)) }"""
    return [swift_round(v) for v in reversed(swift_linspace(0, 999, steps + 1)[1:])]


def swift_first_order(index: int, steps: int) -> bool:
    """step(): lowerOrderStepped < 1, or (below 15 steps) the last or the second-to-last step."""
    return index == 0 or (steps < 15 and index >= steps - 2)


def test_swift_dpm_timesteps_follow_swifts_float32_linspace_and_rounding() -> None:
    differ_from_diffusers = []
    for steps in range(1, 51):
        ours = schedulers.create("dpmpp_2m_swift", CONFIGS["sd15"])
        ours.set_timesteps(steps)
        assert ours.timesteps.tolist() == swift_dpm_timesteps(steps), steps
        ref = reference("dpmpp_2m", CONFIGS["sd15"])
        ref.set_timesteps(steps)
        if ref.timesteps.tolist() != swift_dpm_timesteps(steps):
            differ_from_diffusers.append(steps)
    assert differ_from_diffusers == [6, 12, 14, 18, 24, 26, 28, 30, 36, 42, 46, 48]


def test_swift_schedules_use_swifts_float32_running_product() -> None:
    expected = swift_alphas_cumprod(CONFIGS["sd15"])
    for name in ("dpmpp_2m_swift", "pndm_swift"):
        np.testing.assert_array_equal(schedulers.create(name, CONFIGS["sd15"]).alphas_cumprod, expected)


def swift_dpm_run(steps: int, seed: int = 0) -> tuple[list[int], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Steps dpmpp_2m_swift with random model outputs: the orders taken, inputs, outputs and results."""
    scheduler = schedulers.create("dpmpp_2m_swift", CONFIGS["sd15"])
    scheduler.set_timesteps(steps)
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal(SHAPE).astype(np.float32)
    orders, samples, outputs, results = [], [], [], []
    for index, t in enumerate(scheduler.timesteps):
        orders.append(scheduler.order_at(index))
        output = rng.standard_normal(SHAPE).astype(np.float32)
        samples.append(sample)
        outputs.append(output)
        sample = scheduler.step(output, t, sample)
        results.append(sample)
    return orders, samples, outputs, results


def swift_first_order_update(ac: np.ndarray, t: int, prev_t: int, sample: np.ndarray, output: np.ndarray) -> np.ndarray:
    """firstOrderUpdate, in float64: x = (σ_p/σ_s)·x − α_p(e^{−h} − 1)·x₀ with α, σ = √ᾱ, √(1 − ᾱ)."""
    alpha, sigma = np.sqrt(ac.astype(np.float64)), np.sqrt(1 - ac.astype(np.float64))
    lam = np.log(alpha) - np.log(sigma)
    x0 = (sample - output * sigma[t]) / alpha[t]
    h = lam[prev_t] - lam[t]
    return sigma[prev_t] / sigma[t] * sample - alpha[prev_t] * (np.exp(-h) - 1) * x0


def test_swift_dpm_takes_first_order_steps_where_swift_does() -> None:
    ac = swift_alphas_cumprod(CONFIGS["sd15"])
    for steps in range(1, 51):
        orders, samples, outputs, results = swift_dpm_run(steps)
        assert orders == [1 if swift_first_order(i, steps) else 2 for i in range(steps)], steps
        timesteps = swift_dpm_timesteps(steps)
        for index in range(steps - 1):  # the last step's update is never used (see the next test)
            first = swift_first_order_update(ac, timesteps[index], timesteps[index + 1], samples[index], outputs[index])
            if swift_first_order(index, steps):
                np.testing.assert_allclose(results[index], first, rtol=1e-4, atol=1e-4, err_msg=f"{steps}:{index}")
            else:
                assert np.abs(results[index] - first).max() > 1e-3, f"{steps}:{index} took a first-order step"


@pytest.mark.parametrize("name", ["dpmpp_2m_swift", "pndm_swift"])
def test_swift_schedulers_end_on_the_x0_prediction_swift_decodes(name: str) -> None:
    """The pipeline decodes scheduler.modelOutputs.last: x₀ from the last (combined) ε at the last t.
    A constant ε makes every PLMS combination ε itself, so x₀ is known without the history."""
    ac = swift_alphas_cumprod(CONFIGS["sd15"]).astype(np.float64)
    for steps in (2, 10, 20):
        scheduler = schedulers.create(name, CONFIGS["sd15"])
        scheduler.set_timesteps(steps)
        rng = np.random.default_rng(steps)
        sample, eps = rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(SHAPE).astype(np.float32)
        for t in scheduler.timesteps[:-1]:
            sample = scheduler.step(eps, t, sample)
        t = int(scheduler.timesteps[-1])
        expected = (sample - eps * np.sqrt(1 - ac[t])) / np.sqrt(ac[t])
        np.testing.assert_allclose(scheduler.step(eps, t, sample), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "diffusers_name"), [("dpmpp_2m_swift", "dpmpp_2m"), ("pndm_swift", "pndm")])
def test_swift_steps_equal_diffusers_steps_where_swift_agrees_with_it(name: str, diffusers_name: str) -> None:
    """From 15 steps, at a count whose timesteps agree, only the last step (Swift's decode) differs."""
    for steps in (15, 20, 25):
        ref = reference(diffusers_name, CONFIGS["sd15"])
        ours = schedulers.create(name, CONFIGS["sd15"])
        ref.set_timesteps(steps)
        ours.set_timesteps(steps)
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
        rng = np.random.default_rng(steps)
        sample = rng.standard_normal(SHAPE).astype(np.float32)
        for t in ref.timesteps[:-1]:
            output = rng.standard_normal(SHAPE).astype(np.float32)
            theirs = ref.step(torch.from_numpy(output), t, torch.from_numpy(sample), return_dict=False)[0].numpy()
            np.testing.assert_allclose(ours.step(output, int(t), sample), theirs, rtol=1e-4, atol=1e-4)
            sample = theirs


def test_pndm_swift_refuses_one_step() -> None:
    with pytest.raises(ValueError, match="at least 2 steps"):
        schedulers.create("pndm_swift", CONFIGS["sd15"]).set_timesteps(1)


def test_swift_flavours_refuse_what_swift_cannot_run() -> None:
    for name in ("dpmpp_2m_swift", "pndm_swift"):
        with pytest.raises(ValueError, match="prediction_type='v_prediction'; supported: 'epsilon'"):
            schedulers.create(name, CONFIGS["sd21_v"])
        with pytest.raises(ValueError, match="beta_schedule='squaredcos_cap_v2'"):
            schedulers.create(name, CONFIGS["cosine_trailing_v"] | {"prediction_type": "epsilon"})


@pytest.mark.parametrize(("name", "sampler"), [("dpmpp_2m_swift", "DPM++ 2M Swift"), ("pndm_swift", "PNDM Swift")])
def test_swift_flavour_round_trips_through_the_png_infotext(name: str, sampler: str) -> None:
    text = infotext(Request("a lighthouse", steps=20, guidance_scale=7.5, width=512, height=512, seed=7, scheduler=name), "sd15")
    settings, unknown = job_settings(parse_infotext(text))
    assert unknown == [] and settings["scheduler"] == sampler
    assert schedulers.from_sampler_name(settings["scheduler"]) == name


@pytest.mark.parametrize("name", ["dpmpp_2m_swift", "pndm_swift"])
def test_swift_flavours_run_text_and_image_jobs_and_trace_for_the_device_loop(name: str, tiny, runtime) -> None:
    """The GPU path runs a linear scheduler as a traced plan: the Swift flavours must trace (their last
    step, x₀, is linear too), and both kinds of job run through the pipeline."""
    from PIL import Image

    from diffusiond.daemon.engine import linear_steps
    from diffusiond.daemon.engine.pipeline import Pipeline

    for begin in (0, 3):
        scheduler = schedulers.create(name, tiny.scheduler_config)
        scheduler.set_timesteps(10)
        scheduler.set_begin_index(begin)
        assert linear_steps.trace(scheduler, scheduler.timesteps[begin:]) is not None
    pipeline = Pipeline(tiny, runtime)
    init = Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8))
    for extra in ({}, {"init_image": init, "strength": 0.6}):
        result = pipeline.generate(Request("a lighthouse", steps=6, width=64, height=64, seed=1, scheduler=name, **extra))
        assert result.images[0].shape == (64, 64, 3) and result.request.scheduler == name


@pytest.mark.parametrize(
    ("changes", "scheduler", "steps", "field", "says"),
    [
        ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, "ddim", 20, "scheduler", "v_prediction"),
        ({"final_sigmas_type": "sigma_min", "solver_type": "heun"}, "dpmpp_2m_karras", 20, "steps", "fewer than 15"),
        ({"prediction_type": "v_prediction"}, "dpmpp_2m_swift", 20, "scheduler", "supported: 'epsilon'"),
    ],
)
def test_refusals_reach_the_job_as_invalid_parameter_at_submit(tmp_path, changes, scheduler, steps, field, says) -> None:
    """resolve() runs at submit, before the job is queued: the client gets invalid_parameter, nothing runs."""
    import json
    import shutil

    from diffusiond.daemon.engine.pipeline import resolve
    from diffusiond.daemon.errors import InvalidParameter
    from diffusiond.daemon.models.catalog import TINY
    from diffusiond.daemon.models.diffusers_folder import ModelFolder

    folder = shutil.copytree(TINY, tmp_path / "model")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))
    model = ModelFolder.open(str(folder))
    with pytest.raises(InvalidParameter, match=says) as refused:
        resolve(Request("a lighthouse", steps=steps, scheduler=scheduler), model)
    assert refused.value.field == field and refused.value.code == "invalid_parameter"
    resolve(Request("a lighthouse", steps=steps, scheduler="euler"), model)
