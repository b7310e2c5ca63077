"""The pipeline against diffusers' own pipelines on the shipped tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from diffusiond.daemon.engine import schedulers
from diffusiond.daemon.engine.pipeline import Pipeline, Request
from diffusiond.daemon.engine.runtimes.torch_runtime import TorchRuntime
from diffusiond.daemon.errors import Cancelled, InvalidParameter
from diffusiond.daemon.models.diffusers_folder import ModelFolder

PROMPT = "a lighthouse at dusk, oil painting"
NEGATIVE = "blurry"
SIZE = 128  # latents 16×16: quick, and not the model's default size


class Recording:
    """The real runtime, with each UNet call's batch size written down."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.unet_batches: list[int] = []

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def predict_noise(self, sample, timestep, conditioning):
        self.unet_batches.append(sample.shape[0])
        return self.runtime.predict_noise(sample, timestep, conditioning)


@pytest.fixture(scope="module")
def pipeline(tiny, runtime) -> Pipeline:
    return Pipeline(tiny, runtime)


@pytest.fixture(scope="module")
def reference(tiny) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(tiny.path, safety_checker=None).to("cpu")
    pipe.model_scheduler_config = pipe.scheduler.config  # before any test switches the scheduler
    return pipe


def diffusers_scheduler(name: str, pipe):
    """Switched from the model's own scheduler, as a user switches it (not from the last test's)."""
    cls = getattr(__import__("diffusers"), schedulers.scheduler_class(name).DIFFUSERS_CLASS)
    return cls.from_config(pipe.model_scheduler_config, **schedulers.overrides(name))


def as_uint8(images: np.ndarray) -> np.ndarray:
    return np.round(images * 255).astype(np.uint8)


def assert_close_images(ours: list[np.ndarray], theirs: np.ndarray) -> None:
    diff = np.abs(np.stack(ours).astype(int) - as_uint8(theirs).astype(int))
    assert diff.max() <= 2, f"max pixel difference {diff.max()}/255"


@pytest.mark.parametrize("name", schedulers.DIFFUSERS_NAMES)
def test_txt2img_matches_diffusers(name, pipeline, reference) -> None:
    steps = 4 if name == "lcm" else 12
    guidance = 1.5 if name == "lcm" else 7.5
    reference.scheduler = diffusers_scheduler(name, reference)
    theirs = reference(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance, height=SIZE,
        width=SIZE, generator=torch.Generator().manual_seed(7), output_type="np",
    ).images
    result = pipeline.generate(
        Request(PROMPT, NEGATIVE, steps=steps, guidance_scale=guidance, width=SIZE, height=SIZE, seed=7,
                scheduler=name, rng="torch")
    )
    assert result.images[0].shape == (SIZE, SIZE, 3)
    assert_close_images(result.images, theirs)


def test_numpy_latents_match_diffusers_given_the_same_latents(pipeline, reference) -> None:
    """rng numpy (Apple's generator): diffusers given our initial latents makes the same image."""
    reference.scheduler = diffusers_scheduler("dpmpp_2m", reference)
    latents = np.random.RandomState(42).standard_normal((2, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
    theirs = reference(
        PROMPT, num_inference_steps=10, height=SIZE, width=SIZE, num_images_per_prompt=2,
        latents=torch.from_numpy(latents), output_type="np",
    ).images
    result = pipeline.generate(Request(PROMPT, steps=10, width=SIZE, height=SIZE, count=2, seed=42))
    assert len(result.images) == 2
    assert_close_images(result.images, theirs)
    assert not np.array_equal(result.images[0], result.images[1])


@pytest.mark.parametrize("name", schedulers.DIFFUSERS_NAMES)
def test_img2img_matches_diffusers(name, pipeline, reference, tiny) -> None:
    steps = 8 if name == "lcm" else 10
    img2img = StableDiffusionImg2ImgPipeline(**reference.components)
    img2img.scheduler = diffusers_scheduler(name, reference)
    init = Image.fromarray(np.random.RandomState(0).randint(0, 256, (SIZE, 96, 3), dtype=np.uint8))
    theirs = img2img(
        PROMPT, image=init, strength=0.6, num_inference_steps=steps, generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images
    recording = Recording(pipeline.runtime)
    ours = Pipeline(tiny, recording).generate(
        Request(PROMPT, steps=steps, seed=3, scheduler=name, rng="torch", init_image=init, strength=0.6)
    )
    assert ours.request.width == 96 and ours.request.height == SIZE
    # int(steps × 0.6) steps run (PNDM's schedule repeats one timestep, so it runs one more).
    assert len(recording.unet_batches) == len(img2img.scheduler.timesteps) - (steps - int(steps * 0.6))
    assert_close_images(ours.images, theirs)


class FirstUnetInput(Recording):
    """The real runtime, with the VAE encoder's output and the first UNet call's sample kept."""

    def __init__(self, runtime) -> None:
        super().__init__(runtime)
        self.moments: np.ndarray | None = None
        self.first_sample: np.ndarray | None = None

    def encode(self, pixels):
        self.moments = self.runtime.encode(pixels)
        return self.moments

    def predict_noise(self, sample, timestep, conditioning):
        if self.first_sample is None:
            self.first_sample = sample
        return super().predict_noise(sample, timestep, conditioning)


def test_numpy_img2img_draws_the_start_noise_then_the_encoders_sample_as_apple_does(tiny, runtime) -> None:
    """Apple's StableDiffusionPipeline.generateLatentSamples draws `count` start noises from
    NumPyRandomSource(seed), then Encoder.encode draws one sample of the image's latent from the
    same source, then Scheduler.addNoise mixes them with alphas_cumprod at the first kept step
    (apple/ml-stable-diffusion, swift/StableDiffusion/pipeline, commit e12202c)."""
    from diffusers import DPMSolverMultistepScheduler

    steps, strength, seed, count, size = 10, 0.6, 11, 2, 64
    init = Image.fromarray(np.random.RandomState(1).randint(0, 256, (size, size, 3), dtype=np.uint8))
    recording = FirstUnetInput(runtime)
    Pipeline(tiny, recording).generate(
        Request(PROMPT, steps=steps, seed=seed, count=count, init_image=init, strength=strength, rng="numpy")
    )
    latent_shape = (4, size // 8, size // 8)
    state = np.random.RandomState(seed)
    start = state.standard_normal((count, *latent_shape)).astype(np.float32)
    sample = state.standard_normal((1, *latent_shape))
    mean, logvar = np.split(recording.moments.astype(np.float64), 2, axis=1)
    latent = (mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * sample) * tiny.scaling_factor
    reference = DPMSolverMultistepScheduler.from_config(tiny.scheduler_config)
    reference.set_timesteps(steps)
    alpha = float(reference.alphas_cumprod[int(reference.timesteps[steps - int(steps * strength)])])
    expected = np.sqrt(alpha) * latent + np.sqrt(1 - alpha) * start
    # dpmpp_2m scales no model input; the guided UNet batch is [uncond, cond] of the same latents.
    np.testing.assert_allclose(recording.first_sample[:count], expected, atol=1e-4)


def test_no_unconditional_pass_when_guidance_is_at_most_one(pipeline, reference, tiny) -> None:
    reference.scheduler = diffusers_scheduler("euler", reference)
    theirs = reference(
        PROMPT, num_inference_steps=5, guidance_scale=1.0, height=SIZE, width=SIZE,
        generator=torch.Generator().manual_seed(1), output_type="np",
    ).images
    recording = Recording(pipeline.runtime)
    ours = Pipeline(tiny, recording).generate(
        Request(PROMPT, steps=5, guidance_scale=1.0, width=SIZE, height=SIZE, seed=1, scheduler="euler", rng="torch")
    )
    assert recording.unet_batches == [1] * 5
    assert_close_images(ours.images, theirs)


def test_same_seed_same_image_and_another_seed_another(pipeline) -> None:
    request = Request(PROMPT, steps=3, width=64, height=64, seed=5)
    first, again = pipeline.generate(request), pipeline.generate(request)
    other = pipeline.generate(Request(PROMPT, steps=3, width=64, height=64, seed=6))
    assert np.array_equal(first.images[0], again.images[0])
    assert not np.array_equal(first.images[0], other.images[0])


def test_cancel_stops_within_one_step(pipeline, tiny) -> None:
    recording = Recording(pipeline.runtime)
    seen: list[int] = []
    with pytest.raises(Cancelled, match="after 3 of 20 steps"):
        Pipeline(tiny, recording).generate(
            Request(PROMPT, steps=20, width=64, height=64, seed=1),
            on_step=lambda step, total, latents: seen.append(step),
            cancelled=lambda: len(seen) >= 3,
        )
    assert seen == [1, 2, 3]
    assert len(recording.unet_batches) == 3


def test_progress_reports_every_step_with_latents(pipeline) -> None:
    calls = []
    pipeline.generate(
        Request(PROMPT, steps=6, width=64, height=64, seed=1),
        on_step=lambda step, total, latents: calls.append((step, total, latents.shape)),
    )
    assert calls == [(i, 6, (1, 4, 8, 8)) for i in range(1, 7)]


def test_long_prompt_is_truncated_and_says_so(pipeline) -> None:
    words = " ".join(f"lighthouse{i}" for i in range(60))
    result = pipeline.generate(Request(words, steps=1, width=64, height=64, seed=1))
    assert result.dropped_prompt
    assert words.endswith(result.dropped_prompt)
    assert result.dropped_prompt.endswith("lighthouse58 lighthouse59")
    assert pipeline.generate(Request(PROMPT, steps=1, width=64, height=64, seed=1)).dropped_prompt == ""



def test_a_truncated_prompt_keeps_the_end_token_and_apples_first_76_hidden_states(pipeline, tiny) -> None:
    """Apple's TextEncoder.swift keeps the first 77 ids of an over-long prompt (start + 76 tokens,
    no end token); we keep diffusers' start + 75 tokens + end. CLIP's attention is causal, so the
    first 76 hidden states are the same either way (docs/engine.md, "Apple's Swift pipeline")."""
    words = " ".join(f"lighthouse{i}" for i in range(60))
    from transformers import CLIPTokenizer

    clip = CLIPTokenizer.from_pretrained(str(tiny.tokenizer_dirs[0]))
    apples = np.asarray(clip(words).input_ids[:77], dtype=np.int64)
    ours = pipeline.tokenizers[0].encode(words).ids
    assert ours[-1] == clip.eos_token_id and apples[-1] != clip.eos_token_id
    hidden = pipeline.runtime.encode_text([np.stack([ours, apples])]).hidden
    np.testing.assert_allclose(hidden[0, :76], hidden[1, :76], atol=1e-5)
    assert not np.allclose(hidden[0, 76], hidden[1, 76], atol=1e-3)

@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"steps": 0}, "steps", "from 1 to 150"),
        ({"steps": 151}, "steps", "from 1 to 150"),
        ({"width": 100}, "width", "multiple of 8"),
        ({"height": 4096}, "height", "from 64 to 2048"),
        ({"scheduler": "heun"}, "scheduler", "unknown scheduler 'heun'; choose one of"),
        ({"guidance_scale": float("nan")}, "guidance_scale", "from 0 to 50"),
        ({"count": 0}, "count", "from 1 to 16"),
        ({"seed": -1}, "seed", "from 0 to 4294967295"),
        ({"prompt": ""}, "prompt", "1 to 4000 characters"),
        ({"rng": "mt"}, "rng", "unknown generator"),
        ({"init_image": Image.new("RGB", (64, 64)), "strength": 1.5}, "strength", "at most 1"),
        ({"init_image": Image.new("RGB", (64, 64)), "strength": 0.01}, "strength", "leaves no step"),
        ({"scheduler": "lcm", "steps": 60}, "steps", "original_inference_steps"),
    ],
)
def test_bad_parameters_are_refused_clearly(pipeline, change, field, message) -> None:
    request = Request(**{"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, **change})
    with pytest.raises(InvalidParameter, match=message) as info:
        pipeline.generate(request)
    assert info.value.field == field
    assert info.value.code == "invalid_parameter"


def test_safety_checker_blacks_out_flagged_images_like_diffusers(tiny_with_safety_checker) -> None:
    model = ModelFolder.open(str(tiny_with_safety_checker))
    assert model.has_safety_checker
    pipeline = Pipeline(model, TorchRuntime(model.path, "cpu", with_safety_checker=True))
    result = pipeline.generate(Request(PROMPT, steps=3, width=SIZE, height=SIZE, seed=2, count=2))
    assert result.flagged == [True, True]
    assert all(not image.any() for image in result.images)

    reference = StableDiffusionPipeline.from_pretrained(tiny_with_safety_checker)
    out = reference(PROMPT, num_inference_steps=3, height=SIZE, width=SIZE, num_images_per_prompt=2, output_type="np")
    assert out.nsfw_content_detected == [True, True]

    unchecked = pipeline.generate(Request(PROMPT, steps=3, width=SIZE, height=SIZE, seed=2, safety_checker=False))
    assert unchecked.flagged == [False] and unchecked.images[0].any()
