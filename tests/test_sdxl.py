"""SDXL (base, refiner, base + refiner, Turbo) against diffusers' own SDXL pipelines.

The tiny random-weight models come from tests/build_tiny_sdxl.py, in the shapes of diffusers' own
SDXL tests; Turbo is the base with SDXL-Turbo's scheduler config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from PIL import Image

from diffusiond.daemon.engine import schedulers
from diffusiond.daemon.engine.pipeline import Pipeline, Request, resolve
from diffusiond.daemon.engine.png import infotext
from diffusiond.daemon.engine.runtimes.torch_runtime import TorchRuntime, TorchSettings
from diffusiond.daemon.errors import InvalidParameter, ModelInvalid
from diffusiond.daemon.models import store
from diffusiond.daemon.models.catalog import TINY
from diffusiond.daemon.models.diffusers_folder import ModelFolder
from diffusiond.daemon.models.family import SD, SDXL, SDXL_REFINER
from diffusiond.clients.infotext import job_settings, parse_infotext

from . import build_tiny_sdxl

PROMPT = "a lighthouse at dusk, oil painting"
NEGATIVE = "blurry"
WIDTH, HEIGHT = 96, 64  # not square and not the default size: the size conditioning shows


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny SDXL base, refiner and Turbo (the base with SDXL-Turbo's scheduler config) folders."""
    root = tmp_path_factory.mktemp("sdxl")
    build_tiny_sdxl.build(root / "base")
    build_tiny_sdxl.build(root / "refiner", refiner=True)
    turbo = root / "turbo"
    shutil.copytree(root / "base", turbo)
    # stabilityai/sdxl-turbo's scheduler_config.json: Euler ancestral with trailing spacing.
    config = json.loads((turbo / "scheduler" / "scheduler_config.json").read_text())
    config.update(_class_name="EulerAncestralDiscreteScheduler", timestep_spacing="trailing")
    (turbo / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return {"base": root / "base", "refiner": root / "refiner", "turbo": turbo}


@pytest.fixture(scope="module")
def models(folders) -> dict[str, ModelFolder]:
    opened = {name: ModelFolder.open(str(path)) for name, path in folders.items()}
    assert all(isinstance(m, ModelFolder) for m in opened.values())
    return opened  # type: ignore[return-value]


@pytest.fixture(scope="module")
def pipelines(models) -> dict[str, Pipeline]:
    return {name: Pipeline(model, TorchRuntime(model.path, "cpu")) for name, model in models.items()}


@pytest.fixture(scope="module")
def reference(folders) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(folders["base"], add_watermarker=False).to("cpu")


@pytest.fixture(scope="module")
def reference_refiner(folders) -> StableDiffusionXLImg2ImgPipeline:
    return StableDiffusionXLImg2ImgPipeline.from_pretrained(folders["refiner"], add_watermarker=False).to("cpu")


def assert_close_images(ours: list[np.ndarray], theirs: np.ndarray) -> None:
    diff = np.abs(np.stack(ours).astype(int) - np.round(theirs * 255).astype(int))
    assert diff.max() <= 2, f"max pixel difference {diff.max()}/255"


def init_image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


# Model facts


def test_families_tokenizers_and_conditioning_switches_come_from_the_folders(models) -> None:
    base, refiner, turbo = models["base"], models["refiner"], models["turbo"]
    assert (base.family, refiner.family, turbo.family) == (SDXL, SDXL_REFINER, SDXL)
    assert [p.name for p in base.tokenizer_dirs] == ["tokenizer", "tokenizer_2"]
    assert [p.name for p in refiner.tokenizer_dirs] == ["tokenizer_2"]
    assert (base.force_zeros_for_empty_prompt, refiner.force_zeros_for_empty_prompt) == (True, False)
    assert (base.requires_aesthetics_score, refiner.requires_aesthetics_score) == (False, True)
    assert base.default_shape == (64, 64)  # UNet sample_size 32 × the tiny VAE's factor 2
    assert ModelFolder.open(str(TINY)).family == SD and not ModelFolder.open(str(TINY)).force_zeros_for_empty_prompt


def real_sdxl_facts(folder: Path) -> ModelFolder:
    """The configs (no weights) of stabilityai/stable-diffusion-xl-base-1.0 that the facts come
    from: unet sample_size 128, a VAE of four blocks (8×)."""
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        (folder / part).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": 128, "in_channels": 4}))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    model = ModelFolder.open(str(folder))
    assert isinstance(model, ModelFolder)
    return model


def test_real_sdxl_configs_give_1024_as_the_default_size(tmp_path) -> None:
    model = real_sdxl_facts(tmp_path)
    assert model.family == SDXL and model.default_shape == (1024, 1024)


def test_an_sdxl_folder_without_its_second_text_encoder_is_refused(folders, tmp_path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(folders["base"], broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelInvalid, match=r"SDXL .*StableDiffusionXLPipeline.*lacks text_encoder_2"):
        ModelFolder.open(str(broken))


def test_hub_downloads_fetch_the_second_text_encoder_and_tokenizer() -> None:
    files = ["model_index.json", "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
             "text_encoder_2/model.fp16.safetensors", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert {"text_encoder_2/model.safetensors", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt"} <= set(
        store.runtime_files(files, gpu=False))
    gpu = store.runtime_files(files, gpu=True)
    assert "text_encoder_2/model.fp16.safetensors" in gpu and "text_encoder_2/model.safetensors" not in gpu
    assert "vae/diffusion_pytorch_model.fp16.safetensors" in gpu


def test_a_folder_of_fp16_variant_weights_loads(folders, pipelines, tmp_path) -> None:
    """What a GPU's download holds (only *.fp16.safetensors): from_pretrained needs variant="fp16"."""
    fp16 = tmp_path / "fp16"
    shutil.copytree(folders["base"], fp16)
    for weights in fp16.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    runtime = TorchRuntime(fp16, "cpu")
    ids = [np.stack([t.encode(PROMPT).ids]) for t in pipelines["base"].tokenizers]
    expected = pipelines["base"].runtime.encode_text(ids)
    got = runtime.encode_text(ids)
    np.testing.assert_array_equal(got.hidden, expected.hidden)
    np.testing.assert_array_equal(got.pooled, expected.pooled)


# The torch runtime and the pipeline against diffusers


def test_text_encoding_is_diffusers_encode_prompt(pipelines, reference, reference_refiner) -> None:
    """Penultimate hidden states of both encoders side by side, the last encoder's pooled projection."""
    for pipeline, pipe in ((pipelines["base"], reference), (pipelines["refiner"], reference_refiner)):
        ids = [np.stack([t.encode(NEGATIVE).ids, t.encode(PROMPT).ids]) for t in pipeline.tokenizers]
        ours = pipeline.runtime.encode_text(ids)
        with torch.no_grad():
            hidden, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, negative_prompt=NEGATIVE, device="cpu")
        np.testing.assert_allclose(ours.hidden, torch.cat([negative, hidden]).numpy(), atol=1e-5)
        np.testing.assert_allclose(ours.pooled, torch.cat([negative_pooled, pooled]).numpy(), atol=1e-5)


def diffusers_scheduler(name: str, pipe, config=None):
    """Switched from the model's own scheduler config, as a user switches it."""
    cls = getattr(__import__("diffusers"), schedulers.scheduler_class(name).DIFFUSERS_CLASS)
    return cls.from_config(config or pipe.scheduler.config, **schedulers.overrides(name))


class Recording:
    """The real runtime, with each UNet call's batch size, timestep and conditioning written down."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.calls: list[tuple[int, float]] = []
        self.conditionings: list = []

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def predict_noise(self, sample, timestep, conditioning):
        self.calls.append((sample.shape[0], float(timestep)))
        self.conditionings.append(conditioning)
        return self.runtime.predict_noise(sample, timestep, conditioning)


def run_diffusers(pipe, *args, **kwargs):
    """A diffusers pipeline's images, and what its UNet was given at the first step (through its
    step-end callback): prompt_embeds, add_text_embeds, add_time_ids."""
    seen: dict[str, np.ndarray] = {}

    def keep(_pipe, _i, _t, tensors):
        if not seen:
            seen.update({name: tensor.detach().numpy().copy() for name, tensor in tensors.items()})
        return {}

    images = pipe(*args, **kwargs, callback_on_step_end=keep,
                  callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds", "add_time_ids"]).images
    return images, seen


def assert_same_conditioning(recording: Recording, seen: dict[str, np.ndarray]) -> None:
    """The size conditioning exactly, the text conditioning to float32 rounding."""
    ours = recording.conditionings[0]
    np.testing.assert_array_equal(ours.time_ids, seen["add_time_ids"])
    np.testing.assert_allclose(ours.hidden, seen["prompt_embeds"], atol=1e-5)
    np.testing.assert_allclose(ours.text_embeds, seen["add_text_embeds"], atol=1e-5)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_txt2img_with_a_negative_prompt_matches_diffusers(name, pipelines, reference) -> None:
    pipe = StableDiffusionXLPipeline(**{**reference.components, "scheduler": diffusers_scheduler(name, reference)})
    theirs, seen = run_diffusers(pipe, PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=5.0,
                                 height=HEIGHT, width=WIDTH, generator=torch.Generator().manual_seed(7), output_type="np")
    recording = Recording(pipelines["base"].runtime)
    ours = Pipeline(pipelines["base"].model, recording).generate(
        Request(PROMPT, NEGATIVE, steps=6, guidance_scale=5.0, width=WIDTH, height=HEIGHT, seed=7, scheduler=name,
                rng="torch"))
    assert ours.images[0].shape == (HEIGHT, WIDTH, 3)
    assert recording.conditionings[0].time_ids.tolist() == [[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]] * 2
    assert_same_conditioning(recording, seen)
    assert_close_images(ours.images, theirs)


def test_an_empty_negative_prompt_is_zeros_as_diffusers_force_zeros_for_empty_prompt(pipelines, reference) -> None:
    """diffusers zeroes the negative embeddings when negative_prompt is None and the model says
    force_zeros_for_empty_prompt; the encoding of "" would make another image."""
    pipe = StableDiffusionXLPipeline(**{**reference.components, "scheduler": diffusers_scheduler("euler", reference)})
    kwargs = dict(num_inference_steps=5, guidance_scale=5.0, height=HEIGHT, width=WIDTH, output_type="np")
    theirs, seen = run_diffusers(pipe, PROMPT, generator=torch.Generator().manual_seed(3), **kwargs)
    _, encoded_empty = run_diffusers(pipe, PROMPT, negative_prompt="", generator=torch.Generator().manual_seed(3), **kwargs)
    recording = Recording(pipelines["base"].runtime)
    ours = Pipeline(pipelines["base"].model, recording).generate(
        Request(PROMPT, steps=5, guidance_scale=5.0, width=WIDTH, height=HEIGHT, seed=3, scheduler="euler", rng="torch"))
    negative = recording.conditionings[0].take(slice(0, 1))
    assert not negative.hidden.any() and not negative.text_embeds.any()
    assert encoded_empty["prompt_embeds"][0].any()  # what "" encodes to: not zeros
    assert_same_conditioning(recording, seen)
    assert_close_images(ours.images, theirs)


def test_img2img_on_the_base_matches_diffusers(pipelines, reference) -> None:
    pipe = StableDiffusionXLImg2ImgPipeline(**{**reference.components, "scheduler": diffusers_scheduler("euler", reference)})
    theirs, seen = run_diffusers(pipe, PROMPT, image=init_image(), strength=0.6, num_inference_steps=8,
                                 guidance_scale=5.0, generator=torch.Generator().manual_seed(5), output_type="np")
    recording = Recording(pipelines["base"].runtime)
    ours = Pipeline(pipelines["base"].model, recording).generate(
        Request(PROMPT, steps=8, guidance_scale=5.0, seed=5, scheduler="euler", rng="torch", init_image=init_image(),
                strength=0.6))
    assert_same_conditioning(recording, seen)
    assert (ours.request.width, ours.request.height) == (WIDTH, HEIGHT)
    assert_close_images(ours.images, theirs)


def test_the_refiner_alone_refines_an_image_as_diffusers_does(pipelines, reference_refiner) -> None:
    """Aesthetic-score conditioning (6, the negative 2.5) and the second text encoder only."""
    pipe = reference_refiner
    pipe.scheduler = diffusers_scheduler("euler", pipe)
    theirs, seen = run_diffusers(pipe, PROMPT, negative_prompt=NEGATIVE, image=init_image(1), strength=0.5,
                                 num_inference_steps=8, guidance_scale=5.0, generator=torch.Generator().manual_seed(9),
                                 output_type="np")
    recording = Recording(pipelines["refiner"].runtime)
    ours = Pipeline(pipelines["refiner"].model, recording).generate(
        Request(PROMPT, NEGATIVE, steps=8, guidance_scale=5.0, seed=9, scheduler="euler", rng="torch",
                init_image=init_image(1), strength=0.5))
    assert recording.conditionings[0].time_ids.tolist() == [[HEIGHT, WIDTH, 0, 0, 2.5], [HEIGHT, WIDTH, 0, 0, 6.0]]
    assert_same_conditioning(recording, seen)
    assert_close_images(ours.images, theirs)


@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_base_then_refiner_is_diffusers_ensemble_of_experts(name, pipelines, models, reference, reference_refiner) -> None:
    """diffusers: base(denoising_end=0.8, output_type="latent") → refiner(image=latents,
    denoising_start=0.8), one generator through both; no decode in between."""
    steps, switch = 10, 0.8
    base = StableDiffusionXLPipeline(**{**reference.components, "scheduler": diffusers_scheduler(name, reference)})
    reference_refiner.scheduler = diffusers_scheduler(name, reference_refiner)
    generator = torch.Generator().manual_seed(11)
    latents = base(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=5.0, height=HEIGHT,
                   width=WIDTH, denoising_end=switch, generator=generator, output_type="latent").images
    theirs = reference_refiner(PROMPT, negative_prompt=NEGATIVE, image=latents, num_inference_steps=steps,
                               guidance_scale=5.0, denoising_start=switch, generator=generator, output_type="np").images
    base_unet, refiner_unet = Recording(pipelines["base"].runtime), Recording(pipelines["refiner"].runtime)
    seen: list[tuple[int, int]] = []
    ours = Pipeline(models["base"], base_unet).generate(
        Request(PROMPT, NEGATIVE, steps=steps, guidance_scale=5.0, width=WIDTH, height=HEIGHT, seed=11, scheduler=name,
                rng="torch", refiner="refiner", refiner_switch=switch),
        on_step=lambda step, total, _latents: seen.append((step, total)),
        refiner=Pipeline(models["refiner"], refiner_unet),
    )
    assert_close_images(ours.images, theirs)
    # leading spacing, 10 steps: 901 … 1; the base runs those ≥ 200, the refiner the two below.
    assert [t for _, t in base_unet.calls] == [901, 801, 701, 601, 501, 401, 301, 201]
    assert [t for _, t in refiner_unet.calls] == [101, 1]
    assert refiner_unet.conditionings[0].time_ids.tolist() == [[HEIGHT, WIDTH, 0, 0, 2.5], [HEIGHT, WIDTH, 0, 0, 6.0]]
    assert refiner_unet.conditionings[0].hidden.shape[-1] == 32  # the second text encoder's alone
    assert seen == [(k, steps) for k in range(1, steps + 1)]
    assert (ours.request.refiner, ours.request.refiner_switch) == ("refiner", switch)


def test_turbo_runs_its_trailing_schedule_in_one_unguided_step(pipelines, reference, folders) -> None:
    """SDXL-Turbo as its model card runs it: 1 step, guidance 0, its scheduler config (Euler a, trailing)."""
    config = json.loads((folders["turbo"] / "scheduler" / "scheduler_config.json").read_text())
    pipe = StableDiffusionXLPipeline(**{**reference.components, "scheduler": EulerAncestralDiscreteScheduler.from_config(config)})
    theirs = pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, height=HEIGHT, width=WIDTH,
                  generator=torch.Generator().manual_seed(2), output_type="np").images
    recording = Recording(pipelines["turbo"].runtime)
    ours = Pipeline(pipelines["turbo"].model, recording).generate(
        Request(PROMPT, steps=1, guidance_scale=0.0, width=WIDTH, height=HEIGHT, seed=2, scheduler="euler_a", rng="torch"))
    assert recording.calls == [(1, 999.0)]  # trailing: the first step is the last training timestep
    assert_close_images(ours.images, theirs)


def test_the_device_loop_gives_the_host_loops_image(models, pipelines) -> None:
    """The device loop's static buffers carry SDXL's text_embeds and time_ids (here on the CPU)."""
    model = models["base"]
    device = Pipeline(model, TorchRuntime(model.path, "cpu", settings=TorchSettings(device_loop="on")))
    request = Request(PROMPT, NEGATIVE, steps=4, guidance_scale=5.0, width=WIDTH, height=HEIGHT, seed=4, scheduler="euler")
    assert device.runtime.device_loop
    np.testing.assert_allclose(device.generate(request).images[0].astype(int),
                               pipelines["base"].generate(request).images[0].astype(int), atol=1)


# Bad input: refused with the option and the model family named


def refused(request: Request, model, refiner=None) -> InvalidParameter:
    with pytest.raises(InvalidParameter) as info:
        resolve(request, model, refiner=refiner)
    return info.value


def test_a_refiner_after_an_sd_model_is_refused(tiny) -> None:
    error = refused(Request(PROMPT, refiner="refiner"), tiny)
    assert error.field == "refiner" and "SD 1.x/2.x model" in str(error) and "SDXL base" in str(error)


def test_a_base_given_as_refiner_is_refused(models) -> None:
    error = refused(Request(PROMPT, refiner="base"), models["base"], models["base"])
    assert error.field == "refiner" and "is an SDXL model, not an SDXL refiner" in str(error)


def test_a_refiner_given_as_the_base_of_a_refiner_is_refused(models) -> None:
    error = refused(Request(PROMPT, init_image=init_image(), refiner="refiner"), models["refiner"], models["refiner"])
    assert error.field == "refiner" and "is itself an SDXL refiner" in str(error)


def test_a_refiner_model_alone_needs_an_init_image(models) -> None:
    error = refused(Request(PROMPT), models["refiner"])
    assert error.field == "init_image" and "SDXL refiner, which refines an image" in str(error)


@pytest.mark.parametrize("switch", [0, 1, 1.5, -0.2, float("nan"), "0.8"])
def test_refiner_switch_outside_zero_to_one_is_refused(switch, models) -> None:
    error = refused(Request(PROMPT, refiner="refiner", refiner_switch=switch), models["base"], models["refiner"])
    assert error.field == "refiner_switch" and "above 0 and below 1" in str(error)


def test_a_switch_that_leaves_the_base_no_step_is_refused(models) -> None:
    """Leading spacing, 2 steps: timesteps 501 and 1; switching at 0.3 leaves the base none ≥ 700."""
    error = refused(Request(PROMPT, steps=2, refiner="refiner", refiner_switch=0.3), models["base"], models["refiner"])
    assert error.field == "refiner_switch" and "the base runs 0 and the refiner 2" in str(error)


def test_a_size_off_the_grid_names_the_family_and_its_native_size(tmp_path) -> None:
    error = refused(Request(PROMPT, width=1020, height=1024), real_sdxl_facts(tmp_path))
    assert error.field == "width" and "multiple of 8" in str(error) and "SDXL model (native 1024x1024)" in str(error)


# Infotext and --reuse


def test_the_png_records_the_refiner_in_a1111s_keys_and_reuse_takes_them_back(models) -> None:
    """AUTOMATIC1111 writes and reads `Refiner` and `Refiner switch at`
    (modules/processing_scripts/refiner.py, its infotext fields)."""
    request = resolve(Request(PROMPT, steps=10, seed=1, refiner="/models/sdxl-refiner", refiner_switch=0.7),
                      models["base"], refiner=models["refiner"])
    text = infotext(request, "/models/sdxl-base")
    assert "Refiner: /models/sdxl-refiner, Refiner switch at: 0.7" in text
    settings, unknown = job_settings(parse_infotext(text))
    assert (settings["refiner"], settings["refiner_switch"], settings["model"]) == ("/models/sdxl-refiner", 0.7, "/models/sdxl-base")
    assert unknown == []
    assert "Refiner" not in infotext(resolve(Request(PROMPT, seed=1), models["base"]), "base")


# End to end: `diffuse` through the real daemon


def test_diffuse_runs_sdxl_and_base_plus_refiner_through_the_daemon(folders, tmp_path) -> None:
    """Both models stay warm for the job (max_loaded is 1: the base is kept while its refiner loads)."""
    import subprocess
    import sys

    from diffusiond.clients.pngtext import read_text

    from .daemon_process import Daemon

    base, refiner = str(folders["base"]), str(folders["refiner"])
    daemon = Daemon(tmp_path / "daemon", model=base).start()

    def diffuse(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(daemon.runtime_dir),
                               *args], capture_output=True, text=True, timeout=300)

    try:
        done = diffuse("-m", base, "a lighthouse at dusk", "--steps", "2", "--seed", "5", "-o", str(tmp_path / "a"))
        assert done.returncode == 0, done.stderr
        (path,) = done.stdout.split()
        info = parse_infotext(read_text(path)["parameters"])
        assert (info.params["Model"], info.params["Size"]) == (base, "64x64")
        with Image.open(path) as image:
            assert image.size == (64, 64)

        done = diffuse("-m", base, "a lighthouse at dusk", "--steps", "4", "--refiner", refiner, "--refiner-switch",
                       "0.5", "-o", str(tmp_path / "b"))
        assert done.returncode == 0, done.stderr
        (path,) = done.stdout.split()
        params = parse_infotext(read_text(path)["parameters"]).params
        assert (params["Refiner"], params["Refiner switch at"]) == (refiner, "0.5")
        assert sorted(daemon.call("ping")["models"]["loaded"]) == sorted([base, refiner])

        again = diffuse("--reuse", path, "-o", str(tmp_path / "c"))
        assert again.returncode == 0, again.stderr
        with Image.open(path) as first, Image.open(again.stdout.split()[0]) as second:
            assert np.array_equal(np.asarray(first), np.asarray(second))

        refused = diffuse("-m", "tiny", "a cat", "--refiner", refiner)
        assert refused.returncode != 0 and "refiner: tiny is an SD 1.x/2.x model" in refused.stderr
    finally:
        assert daemon.stop() == 0
        daemon.close()


def test_diffusiond_generate_runs_base_plus_refiner_in_process(folders, models, pipelines, tmp_path) -> None:
    import subprocess
    import sys

    out = tmp_path / "image.png"
    done = subprocess.run(
        [sys.executable, "-m", "diffusiond.daemon.cli", "generate", PROMPT, "-m", str(folders["base"]), "--refiner",
         str(folders["refiner"]), "--refiner-switch", "0.5", "--steps", "4", "--seed", "8", "--scheduler", "euler",
         "--size", f"{WIDTH}x{HEIGHT}", "--device", "cpu", "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    expected = pipelines["base"].generate(
        Request(PROMPT, steps=4, seed=8, scheduler="euler", width=WIDTH, height=HEIGHT, refiner=str(folders["refiner"]),
                refiner_switch=0.5),
        refiner=pipelines["refiner"],
    )
    with Image.open(out) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), expected.images[0])
        assert f"Refiner: {folders['refiner']}, Refiner switch at: 0.5" in image.text["parameters"]


def test_in_half_precision_sdxls_vae_stays_float32_as_its_config_says(folders, tiny) -> None:
    """diffusers' SDXL pipelines upcast the VAE when it is float16 and its config says force_upcast
    (SDXL's VAE overflows in half precision); SD's pipelines never do."""
    sdxl = TorchRuntime(folders["base"], "cpu", settings=TorchSettings(precision="fp16"))
    assert AutoencoderKL.load_config(folders["base"] / "vae")["force_upcast"]
    assert (sdxl.unet.dtype, sdxl.vae.dtype, sdxl.vae_dtype) == (torch.float16, torch.float32, torch.float32)
    decoded = sdxl.decode(np.zeros((1, 4, 8, 8), np.float32))
    assert decoded.shape == (1, 3, 16, 16) and np.isfinite(decoded).all()
    sd = TorchRuntime(tiny.path, "cpu", settings=TorchSettings(precision="fp16"))
    assert sd.vae.dtype == torch.float16
