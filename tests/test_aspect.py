"""A request's `aspect` ("16:9") instead of a size: the model family's trained size nearest it.

SDXL's buckets are the SDXL paper's (Podell et al. 2023, §2.3 and appendix I; the subset tools
offer, daemon/models/aspect.py cites where). The resolve tests run on folders holding only the real
models' configs (stabilityai/stable-diffusion-xl-base-1.0: UNet sample_size 128, a VAE of four
blocks; runwayml/stable-diffusion-v1-5: sample_size 64, the same VAE) and on Apple's published Core
ML layouts (tests/fixtures/coreml_hub). The end-to-end test runs the tiny SDXL
(tests/build_tiny_sdxl.py) through the real daemon with its UNet's config saying sample_size 64:
native 128×128 with the tiny VAE's factor 2, an eighth of SDXL's 1024, so every bucket is exactly an
eighth of itself and at least 64 px a side. At the tiny model's own 64×64 the scaled buckets fall
under the 64 px the daemon takes, which is a refusal tested here too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusiond.clients.infotext import parse_infotext
from diffusiond.clients.pngtext import read_text
from diffusiond.daemon.config import MIN_SIZE
from diffusiond.daemon.engine.pipeline import Request, Resolved, resolve
from diffusiond.daemon.errors import InvalidParameter
from diffusiond.daemon.models import aspect
from diffusiond.daemon.models.catalog import TINY
from diffusiond.daemon.models.coreml_folder import CoreMLFolder
from diffusiond.daemon.models.diffusers_folder import ModelFolder
from diffusiond.daemon.models.family import SD, SDXL

from . import build_tiny_sdxl
from .daemon_process import Daemon
from .test_coreml_published import unpacked

# The set SDXL tools offer, each (width, height) with the ratio it is asked by.
BUCKETS = {"1:1": (1024, 1024), "9:7": (1152, 896), "7:9": (896, 1152), "19:13": (1216, 832), "13:19": (832, 1216),
           "7:4": (1344, 768), "4:7": (768, 1344), "12:5": (1536, 640), "5:12": (640, 1536)}


def facts(folder: Path, pipeline_class: str, sample_size: int) -> ModelFolder:
    """A model folder with a real model's configs and no weights: what resolve reads."""
    parts = ("text_encoder", "tokenizer") + (("text_encoder_2", "tokenizer_2") if "XL" in pipeline_class else ())
    for part in ("unet", "vae", *parts):
        (folder / part).mkdir(parents=True)
    shutil.copytree(TINY / "scheduler", folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": sample_size, "in_channels": 4}))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    model = ModelFolder.open(str(folder))
    assert isinstance(model, ModelFolder)
    return model


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> ModelFolder:
    model = facts(tmp_path_factory.mktemp("sdxl"), "StableDiffusionXLPipeline", 128)
    assert (model.family, model.default_shape) == (SDXL, (1024, 1024))
    return model


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> ModelFolder:
    model = facts(tmp_path_factory.mktemp("sd15"), "StableDiffusionPipeline", 64)
    assert (model.family, model.default_shape) == (SD, (512, 512))
    return model


def size(model, shape: str, **fields) -> tuple[int, int]:
    request = resolve(Request("a lighthouse", aspect=shape, **fields), model)
    assert isinstance(request, Resolved)
    return request.width, request.height


def refused(model, shape: object, **fields) -> InvalidParameter:
    with pytest.raises(InvalidParameter) as info:
        resolve(Request("a lighthouse", aspect=shape, **fields), model)  # type: ignore[arg-type]
    return info.value


# The choice


@pytest.mark.parametrize("shape", BUCKETS)
def test_each_buckets_own_ratio_gives_that_bucket_on_sdxl(sdxl, shape) -> None:
    assert size(sdxl, shape) == BUCKETS[shape]


def test_common_ratios_give_their_nearest_bucket_on_sdxl(sdxl) -> None:
    assert size(sdxl, "16:9") == (1344, 768)
    assert size(sdxl, "9:16") == (768, 1344)
    assert size(sdxl, "3:2") == (1216, 832)
    assert size(sdxl, "4:3") == (1152, 896)
    assert size(sdxl, "2.39:1") == (1536, 640)
    assert size(sdxl, "4:1") == (1536, 640)  # beyond the widest bucket, the widest


def test_an_sdxl_model_trained_at_another_size_scales_the_buckets() -> None:
    """SDXL-Turbo was trained at 512×512 (docs/engine.md): the buckets at half their sides."""
    assert aspect.size(SDXL, aspect.parse("16:9"), (512, 512), 8) == (672, 384)
    assert all(aspect.size(SDXL, Fraction(w, h), (512, 512), 8) == (w // 2, h // 2) for w, h in BUCKETS.values())


def test_sd_keeps_its_native_area_in_the_asked_ratio_on_the_vaes_grid(sd15, tmp_path) -> None:
    width, height = size(sd15, "3:2")
    assert (width, height) == (624, 416)  # 3:2 exactly, 259,584 px against 512² = 262,144
    assert width % 8 == 0 and height % 8 == 0 and abs(width * height - 512 * 512) < 8 * 512
    assert size(sd15, "1:1") == (512, 512)
    assert size(sd15, "9:16") == (384, 680)
    sd2 = facts(tmp_path / "sd2", "StableDiffusionPipeline", 96)  # SD 2.x at 768
    assert size(sd2, "3:2") == (944, 624)


def test_an_aspect_sizes_img2img_instead_of_the_init_image(sdxl) -> None:
    assert size(sdxl, "16:9", init_image=Image.new("RGB", (512, 512))) == (1344, 768)


def test_without_its_model_the_aspect_waits_for_the_run(sdxl) -> None:
    """A Hub model not downloaded yet: the form is checked at submit, the size chosen when it runs."""
    waiting = resolve(Request("a lighthouse", aspect="16:9", seed=3), None)
    assert isinstance(waiting, Request) and (waiting.aspect, waiting.width, waiting.height) == ("16:9", None, None)
    ran = resolve(waiting, sdxl)
    assert (ran.width, ran.height, ran.seed) == (1344, 768, 3)
    with pytest.raises(InvalidParameter, match="aspect: must be a ratio W:H"):
        resolve(Request("a lighthouse", aspect="wide"), None)


# Refusals


def test_an_aspect_with_a_size_is_refused_naming_both(sdxl) -> None:
    for fields in ({"width": 1024, "height": 1024}, {"width": 1024}, {"height": 768}):
        error = refused(sdxl, "16:9", **fields)
        assert error.field == "aspect" and "not both" in str(error) and "width" in str(error) and "height" in str(error)


@pytest.mark.parametrize("shape", ["0:1", "1:0", "-16:9", "16/9", "16x9", "wide", "", "5:1", "1:4.5", "1e3:1", 1.5])
def test_a_malformed_or_absurd_ratio_is_refused_saying_what_is_allowed(sdxl, shape) -> None:
    error = refused(sdxl, shape)
    assert error.field == "aspect" and "from 1:4 to 4:1" in str(error)


def test_an_aspect_whose_size_falls_outside_the_limits_is_refused(tmp_path) -> None:
    """The tiny SDXL at its own 64×64: 16:9's bucket scaled to a sixteenth is 88x48."""
    model = ModelFolder.open(str(build_tiny_sdxl.build(tmp_path / "tiny-sdxl")))
    assert model.default_shape == (64, 64)
    error = refused(model, "16:9")
    assert error.field == "aspect" and "makes 88x48" in str(error) and f"{MIN_SIZE} to 2048" in str(error)
    assert size(model, "1:1") == (64, 64)


def test_a_core_ml_model_takes_only_the_aspect_of_its_one_size(tmp_path) -> None:
    sd = CoreMLFolder.open(unpacked("apple/coreml-stable-diffusion-v1-5-palettized",
                                    "coreml-stable-diffusion-v1-5-palettized_original_compiled.zip", tmp_path / "sd"),
                           "sd15-coreml-6bit")
    assert sd.fixed_size and sd.default_shape == (512, 512)
    assert size(sd, "1:1") == (512, 512)
    error = refused(sd, "3:2")
    assert error.field == "aspect" and "converted for 512x512 (1:1)" in str(error) and "--resolution" in str(error)
    xl = CoreMLFolder.open(unpacked("apple/coreml-stable-diffusion-xl-base",
                                    "coreml-stable-diffusion-xl-base_original_compiled.zip", tmp_path / "xl"), "sdxl-coreml")
    assert xl.family == SDXL and xl.default_shape == (1024, 1024)
    assert size(xl, "17:16") == (1024, 1024)  # its nearest bucket is 1024×1024: the model's own
    assert refused(xl, "16:9").field == "aspect"


# End to end: `diffuse --aspect` through the real daemon


@pytest.fixture(scope="module")
def tiny_sdxl_at_128(tmp_path_factory) -> Path:
    folder = build_tiny_sdxl.build(tmp_path_factory.mktemp("sdxl") / "base")
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["sample_size"] = 64  # × the tiny VAE's 2 = 128 px (the weights do not depend on it)
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    assert ModelFolder.open(str(folder)).default_shape == (128, 128)
    return folder


def test_diffuse_aspect_makes_the_chosen_size_and_records_it(tiny_sdxl_at_128, tmp_path) -> None:
    """16:9 → 1344×768 at an eighth: 168×96. The job and the PNG record the size (not the aspect),
    so --reuse makes the same image again."""
    model = str(tiny_sdxl_at_128)
    daemon = Daemon(tmp_path / "daemon", model=model).start()

    def diffuse(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(daemon.runtime_dir),
                               *args], capture_output=True, text=True, timeout=300)

    try:
        done = diffuse("--json", "submit", "a lighthouse at dusk", "--aspect", "16:9", "--steps", "2", "--seed", "7",
                       "-o", str(tmp_path / "a"))
        assert done.returncode == 0, done.stderr
        job = json.loads(done.stdout.splitlines()[-1])
        assert (job["params"]["width"], job["params"]["height"]) == (168, 96) and "aspect" not in job["params"]
        (path,) = job["outputs"]
        with Image.open(path) as image:
            assert image.size == (168, 96)
        assert parse_infotext(read_text(path)["parameters"]).params["Size"] == "168x96"

        again = diffuse("--reuse", path, "-o", str(tmp_path / "b"))
        assert again.returncode == 0, again.stderr
        with Image.open(path) as first, Image.open(again.stdout.split()[0]) as second:
            assert first.size == second.size and np.array_equal(np.asarray(first), np.asarray(second))

        both = diffuse("a cat", "--aspect", "16:9", "--size", "128x128")
        assert both.returncode == 2 and "aspect: give aspect or width and height, not both" in both.stderr
        absurd = diffuse("a cat", "--aspect", "10:1")
        assert absurd.returncode == 2 and "aspect: 10:1 is outside what is allowed" in absurd.stderr
        not_text = daemon.call("submit", prompt="a cat", aspect=1.5)
        assert not not_text["ok"] and not_text["error"]["code"] == "bad_message"
        assert "aspect: must be a string" in not_text["error"]["message"]
    finally:
        assert daemon.stop() == 0
        daemon.close()


def test_diffusiond_generate_aspect_on_the_tiny_sd_model(tiny, tmp_path) -> None:
    """SD's rule end to end: the tiny model's native 256² area in 3:2 is 312×208 (both multiples of 8)."""
    assert tiny.default_shape == (256, 256)
    out = tmp_path / "image.png"
    done = subprocess.run([sys.executable, "-m", "diffusiond.daemon.cli", "generate", "a lighthouse", "-m", "tiny",
                           "--aspect", "3:2", "--steps", "1", "--device", "cpu", "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        assert image.size == (312, 208) and "Size: 312x208" in image.text["parameters"]
