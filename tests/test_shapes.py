"""What the shipped `shapes` model draws, held to its prompts by the procedural judge
(daemon/models/scenes/judge.py: pixel statistics and geometry, no learned model).

These are the tests that need a model with meaning: a bug that keeps the engine's numbers equal to
diffusers' but breaks guidance, the negative prompt, img2img's strength or a scheduler at its usual
step count draws the wrong scene here. The captions are held out from training (scene.is_held_out).
"""

from __future__ import annotations

import itertools
import platform
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusiond.clients.protocol import Event
from diffusiond.daemon.engine import schedulers
from diffusiond.daemon.engine.pipeline import Pipeline, Request
from diffusiond.daemon.engine.runtimes.torch_runtime import TorchRuntime
from diffusiond.daemon.errors import InvalidParameter
from diffusiond.daemon.models.diffusers_folder import ModelFolder
from diffusiond.daemon.models.scenes import judge, scene

ON_APPLE_SILICON = sys.platform == "darwin" and platform.machine() == "arm64"

README_PROMPT = "a red circle on a blue background"  # README's main command
# Each scheduler at the step count its users run it at (diffusers' and A1111's usual settings).
USUAL_STEPS = {"pndm": 50, "ddim": 50, "dpmpp_2m": 25, "euler": 30, "euler_a": 30, "lcm": 8}
# What this model's schedule refuses, and why: it predicts v on zero terminal SNR (docs/toy-model.md).
REFUSED = {
    "dpmpp_2m_karras": "Karras sigmas on this model's scaled_linear schedule repeat the first timestep",
    "dpmpp_2m_swift": "does not support prediction_type='v_prediction'",  # Apple's Swift schedulers: epsilon only
    "pndm_swift": "does not support prediction_type='v_prediction'",
}


def held_out(count: int, seed: int = 7) -> list[scene.Caption]:
    return [scene.full_caption(s) for s, _ in itertools.islice(scene.samples(seed, held_out=True), count)]


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    folder = ModelFolder.open("shapes")
    return Pipeline(folder, TorchRuntime(folder.path, "cpu"))


def draw(pipeline: Pipeline, prompt: str, seed: int, **settings) -> Image.Image:
    result = pipeline.generate(Request(prompt=prompt, seed=seed, safety_checker=False, **settings))
    return Image.fromarray(result.images[0])


def agreement(pipeline: Pipeline, captions: list[scene.Caption], prompt: str | None = None, **settings) -> float:
    """The share of the attributes the captions name that the judge sees in their pictures (drawn
    from `prompt` instead of each caption, when given)."""
    tally = judge.Tally()
    for i, caption in enumerate(captions):
        tally.add(draw(pipeline, prompt or caption.text, seed=100 + i, **settings), caption.named)
    return sum(tally.right.values()) / sum(tally.asked.values())


def test_the_readme_prompt_draws_the_scene_it_names(pipeline: Pipeline) -> None:
    for seed in range(4):
        seen = judge.read(draw(pipeline, README_PROMPT, seed))
        assert (seen["colour"], seen["shape"], seen["background"]) == ("red", "circle", "blue"), (seed, seen)


def test_guidance_pushes_the_picture_towards_the_caption(pipeline: Pipeline) -> None:
    """Guidance 0, as in diffusers, runs the conditional model alone (no unconditional pass), which
    follows the caption already; guidance above 1 extrapolates from the unconditional picture through
    the caption's, so it must keep following it at the model's own 3 and at SD's 7.5 (with the
    difference's sign wrong it would draw away from the caption). A prompt that names nothing of
    this world draws the captions' attributes at about chance (a third of the shapes, an eighth of
    the colours, a ninth of the places)."""
    captions = held_out(12)
    nothing_named = agreement(pipeline, captions, prompt="a picture")
    unguided = agreement(pipeline, captions, guidance_scale=0.0)
    own = agreement(pipeline, captions)
    sds = agreement(pipeline, captions, guidance_scale=7.5)
    assert nothing_named <= 0.45 and min(unguided, own, sds) >= 0.75, (nothing_named, unguided, own, sds)


def test_a_negative_prompt_removes_what_it_names(pipeline: Pipeline) -> None:
    """The caption leaves the background free; naming one in the negative prompt keeps it out."""
    prompt = "a large red circle in the centre"
    seeds = range(12)
    backgrounds = [judge.read(draw(pipeline, prompt, seed))["background"] for seed in seeds]
    common = max(set(backgrounds), key=backgrounds.count)
    assert backgrounds.count(common) >= 2, backgrounds
    avoided = [judge.read(draw(pipeline, prompt, seed, negative_prompt=f"{common} background"))["background"]
               for seed in seeds]
    assert common not in avoided, (common, avoided)


def test_img2img_keeps_the_layout_at_low_strength_and_follows_the_prompt_at_high(pipeline: Pipeline) -> None:
    start = scene.render(scene.Scene("circle", "red", "blue", "large", "top left"))
    prompt = "a large red circle at the bottom right on a blue background"
    kept = judge.read(draw(pipeline, prompt, 3, init_image=start, strength=0.3))
    followed = judge.read(draw(pipeline, prompt, 3, init_image=start, strength=0.95))
    assert kept["position"] == "top left", kept
    assert followed["position"] == "bottom right", followed


@pytest.mark.parametrize("name", schedulers.NAMES)
def test_every_scheduler_draws_the_scene_at_its_usual_step_count_or_is_refused_saying_why(
        pipeline: Pipeline, name: str) -> None:
    if name in REFUSED:
        with pytest.raises(InvalidParameter, match=re.escape(REFUSED[name])):
            draw(pipeline, README_PROMPT, 1, scheduler=name, steps=25)
        return
    assert agreement(pipeline, held_out(4, seed=11), scheduler=name, steps=USUAL_STEPS[name]) >= 0.8


def test_one_seed_gives_one_scene_and_other_seeds_place_it_where_the_caption_leaves_it_free(
        pipeline: Pipeline) -> None:
    first = np.asarray(draw(pipeline, README_PROMPT, 5))
    assert np.array_equal(first, np.asarray(draw(pipeline, README_PROMPT, 5)))
    places = {judge.read(draw(pipeline, README_PROMPT, seed))["position"] for seed in range(8)}
    assert len(places) >= 3, places


def test_the_daemons_default_model_draws_the_readme_prompt(tmp_path) -> None:
    """Through the real daemon on its default settings, as the README's main command runs it."""
    from .daemon_process import Daemon

    with Daemon(tmp_path, model="shapes") as daemon:
        events = daemon.subscribe(b"job.")
        job_id = daemon.call("submit", prompt=README_PROMPT, seed=1)["job"]["id"]
        done = daemon.wait_for(events, lambda e: e["job"] == job_id and e["type"] == Event.JOB_DONE, timeout=120)
        seen = judge.read(Image.open(done["outputs"][0]))
        assert (seen["colour"], seen["shape"], seen["background"]) == ("red", "circle", "blue"), seen


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    from diffusiond.daemon.coreml.converter import convert

    return convert("shapes", tmp_path_factory.mktemp("coreml") / "shapes", "split_einsum", progress=lambda _: None)


def test_the_shipped_model_converts_to_core_ml_at_its_own_size(converted: Path) -> None:
    """Its added text embedding, wide output convolution and eight latent channels all convert, and
    its own guidance comes along."""
    model = ModelFolder.open(str(converted))
    assert model.runtime == "coreml"
    assert model.default_shape == (64, 64) and model.latent_channels == 8
    assert model.default_guidance == ModelFolder.open("shapes").default_guidance == 3.0  # the source's diffusiond.json


@pytest.mark.skipif(not ON_APPLE_SILICON, reason="Core ML runs models on macOS on Apple silicon only")
def test_the_converted_model_draws_the_readme_prompt_on_a_mac(converted: Path) -> None:
    from diffusiond.daemon.engine.runtimes.coreml_runtime import CoreMLRuntime

    model = ModelFolder.open(str(converted))
    result = Pipeline(model, CoreMLRuntime(model, "cpuAndGPU")).generate(
        Request(prompt=README_PROMPT, seed=1, safety_checker=False))
    seen = judge.read(Image.fromarray(result.images[0]))
    assert (seen["colour"], seen["shape"], seen["background"]) == ("red", "circle", "blue"), seen
