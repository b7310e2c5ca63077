"""A Mac's first run, rehearsed on Linux: the catalog's Core ML repos as published (file names,
layouts, archives, each model's metadata.json: tests/fixtures/coreml_hub), pulled from the test Hub,
opened and run by the real daemon — in an environment where torch and diffusers cannot be imported.

Off a Mac, Core ML's load and predict are replaced by tests/fixtures/coreml_stand_in (it says what
it is): it checks every feed against the model's declared inputs and answers with the shapes
Apple's pipeline expects. On a Mac (macos.yml) the rehearsal runs without it, against the real Hub
and Core ML itself, for the model DIFFUSIOND_REAL_COREML names.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from transformers import CLIPTokenizer

from diffusiond.clients.protocol import Event
from diffusiond.daemon.coreml.hardware import parse_sysctl
from diffusiond.daemon.engine.pipeline import Pipeline, Request, resolve
from diffusiond.daemon.engine.runtimes import Conditioning
from diffusiond.daemon.errors import ModelInvalid
from diffusiond.daemon.models import catalog, coreml_layout
from diffusiond.daemon.models.coreml_folder import CoreMLFolder
from diffusiond.daemon.models.ref import parse

from .daemon_process import Daemon
from .fake_hub import FakeHub, coreml_listing, published_coreml_repo
from .test_models import pull as pull_events

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ON_A_MAC = sys.platform == "darwin" and platform.machine() == "arm64"
REAL = os.environ.get("DIFFUSIOND_REAL_COREML")  # macos.yml: one catalog alias, pulled from the real Hub
CORE_ML = [entry for entry in catalog.CATALOG if entry.runtime == "coreml"]
# What each kind of Mac asks for: the GPU's `original` variant, or the Neural Engine's split_einsum archives
# (pcuenq's carry a Unet and its chunks). The real run takes the GPU's: it compiles in seconds, not minutes.
UNITS = {entry.alias: "cpuAndNeuralEngine" if entry.repo.startswith("pcuenq/") and not REAL else "cpuAndGPU"
         for entry in CORE_ML}


def unpacked(repo_id: str, member: str, tmp_path: Path) -> Path:
    """One archive of a published repo, unpacked as `pull` does: the folder of models inside it."""
    repo = published_coreml_repo(repo_id, tmp_path / "repo")
    return coreml_layout.model_dir(coreml_layout.unpack(repo / member, tmp_path / "unpacked"))


def test_the_fixtures_replicate_every_catalog_core_ml_repo() -> None:
    listed = json.loads((FIXTURES / "coreml_hub" / "repos.json").read_text())
    assert sorted(listed) == sorted(entry.repo for entry in CORE_ML)
    for entry in CORE_ML:
        _variant, files = coreml_layout.coreml_files(list(coreml_listing(entry.repo)), UNITS[entry.alias])
        assert any(f.endswith(".zip") or f.endswith(".mlmodelc") or "/compiled/" in f for f in files), entry.repo


def test_apples_empty_output_shapes_leave_the_size_to_the_inputs(tmp_path) -> None:
    """Apple's compiled models declare `"shape": "[]"` for every output: the VAE's factor comes from
    VAEEncoder's `x` against the Unet's `sample`, or is Stable Diffusion's 8 without an encoder."""
    repo = published_coreml_repo("apple/coreml-stable-diffusion-v1-5-palettized", tmp_path / "repo")
    with_encoder = CoreMLFolder.open(repo / "original" / "compiled", "sd15-coreml-6bit")
    assert with_encoder.descriptions["VAEDecoder"].output("image").shape == ()
    assert (with_encoder.vae_scale_factor, with_encoder.default_shape) == (8, (512, 512))
    request = resolve(Request("a lighthouse"), with_encoder)
    assert (request.width, request.height, request.guidance_scale) == (512, 512, 7.5)  # no diffusiond.json: SD's
    without = CoreMLFolder.open(unpacked("pcuenq/coreml-stable-diffusion-1-4",
                                         "coreml-stable-diffusion-1-4_original_compiled.zip", tmp_path), "sd14-coreml")
    assert "VAEEncoder" not in without.parts and without.default_shape == (512, 512)


def test_a_folder_with_a_unet_and_its_chunks_loads_only_the_chunks(tmp_path, monkeypatch) -> None:
    """Core ML's load is the stand-in here (the boundary this machine lacks); which parts get loaded is ours."""
    monkeypatch.syspath_prepend(str(FIXTURES / "coreml_stand_in"))
    import coreml_stand_in

    from diffusiond.daemon.engine.runtimes import coreml_runtime

    folder = unpacked("pcuenq/coreml-stable-diffusion-2-base",
                      "coreml-stable-diffusion-2-base_split_einsum_compiled.zip", tmp_path)
    assert (folder / "Unet.mlmodelc").is_dir() and (folder / "UnetChunk1.mlmodelc").is_dir()
    model = CoreMLFolder.open(folder, "sd2-base-coreml")
    loaded: list[str] = []
    monkeypatch.setattr(coreml_runtime, "_load", lambda path, units, name: loaded.append(path.name) or coreml_stand_in.load(path, units, name))
    runtime = coreml_runtime.CoreMLRuntime(model, "cpuAndNeuralEngine")
    assert sorted(loaded) == ["TextEncoder.mlmodelc", "UnetChunk1.mlmodelc", "UnetChunk2.mlmodelc",
                              "VAEDecoder.mlmodelc", "VAEEncoder.mlmodelc"]
    latents = np.zeros((2, 4, 64, 64), np.float32)
    assert runtime.predict_noise(latents, np.float32(981), Conditioning(np.zeros((2, 77, 1024), np.float32))).shape == latents.shape


@pytest.mark.parametrize(("network", "inputs", "named"), [
    ("MultiModalDiffusionTransformer", None, "Stable Diffusion 3"),
    ("ControlledUnet", None, "ControlNet (ControlledUnet)"),
    (None, ["additional_residual_0"], "takes additional_residual_0 beyond"),
    ("TextEncoder2", None, "TextEncoder2 (SDXL's) but its Unet takes no time_ids or text_embeds"),
    (None, ["time_ids", "text_embeds"], "has a Stable Diffusion XL Unet but no TextEncoder2"),
])
def test_sd3_controlnet_and_mixed_folders_are_refused_at_open_naming_why(network, inputs, named, tmp_path) -> None:
    """Apple's SD 1.5 folder with what another family adds (torch2coreml.py's names), or with half of
    SDXL's parts (the second text encoder, or the Unet's added conditioning alone): refused at open."""
    repo = published_coreml_repo("apple/coreml-stable-diffusion-v1-5-palettized", tmp_path / "repo")
    folder = repo / "original" / "compiled"
    if network:
        shutil.copytree(folder / "TextEncoder.mlmodelc", folder / f"{network}.mlmodelc")
    if inputs:
        metadata = json.loads((folder / "Unet.mlmodelc" / "metadata.json").read_text())
        metadata[0]["inputSchema"] += [{"name": name, "shape": "[2, 6]", "dataType": "Float16", "type": "MultiArray"}
                                       for name in inputs]
        (folder / "Unet.mlmodelc" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelInvalid, match=re.escape(named)) as refused:
        CoreMLFolder.open(folder, "family")
    assert refused.value.code == "model_invalid"


XL = {"apple/coreml-stable-diffusion-xl-base": "sdxl-coreml",
      "apple/coreml-stable-diffusion-mixed-bit-palettization": "sdxl-coreml-4.5bit",
      "apple/coreml-stable-diffusion-xl-base-with-refiner": "sdxl-with-refiner-coreml"}


@pytest.mark.parametrize("repo_id", XL)
def test_apples_sdxl_repos_open_as_sdxl_and_the_runtime_feeds_them(repo_id, tmp_path, monkeypatch) -> None:
    """Each published SDXL tree (archive NAME_original_compiled.zip → NAME_original_compiled/compiled/)
    opens as SDXL with SDXL base 1.0's facts; the runtime's text encoding and Unet feeds pass the
    stand-in's check against the declared inputs (time_ids flat (12,) or (2, 6), float16). Core ML's
    load is the stand-in here (the boundary this machine lacks); everything before it is ours."""
    monkeypatch.syspath_prepend(str(FIXTURES / "coreml_stand_in"))
    import coreml_stand_in

    from diffusiond.daemon.engine.runtimes import coreml_runtime

    name = repo_id.split("/")[1]
    folder = unpacked(repo_id, f"{name}_original_compiled.zip", tmp_path)
    assert folder.name == "compiled"
    model = CoreMLFolder.open(folder, XL[repo_id])
    assert (model.family, model.default_shape, model.scaling_factor) == ("sdxl", (1024, 1024), 0.13025)
    assert model.scheduler_config["_class_name"] == "EulerDiscreteScheduler" and model.force_zeros_for_empty_prompt
    assert model.palettized == (XL[repo_id] == "sdxl-coreml-4.5bit")
    assert model.has_refiner == (XL[repo_id] == "sdxl-with-refiner-coreml")
    monkeypatch.setattr(coreml_runtime, "_load", coreml_stand_in.load)
    models = [model, model.refiner_model] if model.has_refiner else [model]
    for each in models:
        runtime = coreml_runtime.CoreMLRuntime(each, "cpuAndGPU")
        assert "UnetRefiner" not in runtime.models
        ids = [np.zeros((2, 77), np.int64)] * len(each.text_encoders)
        encoding = runtime.encode_text(ids)
        width = 5 if each.requires_aesthetics_score else 6
        assert encoding.hidden.shape == (2, 77, each.descriptions["Unet"].input("encoder_hidden_states").shape[1])
        assert encoding.pooled is not None and encoding.pooled.shape == (2, 1280)
        conditioning = Conditioning(encoding.hidden, encoding.pooled, np.zeros((2, width), np.float32))
        latents = np.zeros((2, 4, 128, 128), np.float32)
        assert runtime.predict_noise(latents, np.float32(999), conditioning).shape == latents.shape
        # One vocabulary in Apple's tree, yet SDXL's last encoder pads with "!" and its first with
        # <|endoftext|>, as the diffusers original's tokenizer_2 and tokenizer do.
        vocabulary = CLIPTokenizer.from_pretrained(each.tokenizer_dirs[0])
        pads = [tokenizer.encode("a lighthouse").ids[-1] for tokenizer in Pipeline(each, runtime).tokenizers]
        assert pads == [vocabulary.eos_token_id] * (len(pads) - 1) + [vocabulary.convert_tokens_to_ids("!")]
        assert vocabulary.convert_tokens_to_ids("!") != vocabulary.eos_token_id
    if model.has_refiner:
        refiner = model.refiner_model
        assert (refiner.family, refiner.text_encoders) == ("sdxl-refiner", ("TextEncoder2",))
        assert refiner.requires_aesthetics_score and not refiner.force_zeros_for_empty_prompt
        assert refiner.parts["Unet"].name == "UnetRefiner.mlmodelc" and "TextEncoder" not in refiner.parts


def test_palettized_models_are_refused_below_macos_14_naming_the_float16_variant(tmp_path) -> None:
    from diffusiond.daemon.engine.runtimes import refuse_palettized

    m1 = {"machdep.cpu.brand_string": "Apple M1", "hw.perflevel0.physicalcpu": "4", "hw.perflevel1.physicalcpu": "4",
          "hw.memsize": str(8 * 1024**3), "hw.optional.arm64": "1"}
    ventura, sonoma = parse_sysctl(m1, "macOS 13.6.1"), parse_sysctl(m1, "macOS 14.5")
    repo = published_coreml_repo("apple/coreml-stable-diffusion-v1-5-palettized", tmp_path / "repo")
    palettized = CoreMLFolder.open(repo / "original" / "compiled", "sd15-coreml-6bit")
    plain = CoreMLFolder.open(unpacked("pcuenq/coreml-stable-diffusion-v1-5",
                                       "coreml-stable-diffusion-v1-5_original_compiled.zip", tmp_path), "sd15-coreml")
    assert palettized.palettized and not plain.palettized
    with pytest.raises(ModelInvalid, match=r"macOS 14 on, and this Mac has macOS 13\.6\.1: use sd15-coreml "
                                           r"\(pcuenq/coreml-stable-diffusion-v1-5\), its float16 variant"):
        refuse_palettized("sd15-coreml-6bit", palettized.palettized, ventura)
    refuse_palettized("sd15-coreml-6bit", palettized.palettized, sonoma)
    refuse_palettized("sd15-coreml", plain.palettized, ventura)


def in_process_hub(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    """huggingface_hub reads its endpoint at import: point the constants it reads at the fake Hub."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.mark.parametrize("keep", [False, True])
def test_a_pull_needs_room_for_the_archive_and_its_copy_and_then_drops_the_archive(keep, tmp_path, monkeypatch) -> None:
    """In-process, so the disk can be made small (as in test_models)."""
    from diffusiond.daemon.models import store

    repo_id = "pcuenq/coreml-stable-diffusion-2-base"
    repo = published_coreml_repo(repo_id, tmp_path / "repo")
    archive = "coreml-stable-diffusion-2-base_original_compiled.zip"
    size = (repo / archive).stat().st_size
    with FakeHub({repo_id: repo}) as hub:
        in_process_hub(hub, tmp_path, monkeypatch)
        real_usage = shutil.disk_usage
        monkeypatch.setattr(store.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=size * 3 // 2))
        with pytest.raises(store.InsufficientDisk, match=r"to unpack the archives"):
            store.pull(repo_id, False, lambda progress: None, compute_units="cpuAndGPU")
        assert not [r for r in hub.requests if "/resolve/" in r.path]
        monkeypatch.setattr(store.shutil, "disk_usage", real_usage)
        folder = store.pull(repo_id, False, lambda progress: None, compute_units="cpuAndGPU", keep_archives=keep)
    assert CoreMLFolder.open(folder, repo_id).default_shape == (512, 512)
    snapshots = list((tmp_path / "hf" / "hub").glob("models--*/snapshots/*"))
    blobs = list((tmp_path / "hf" / "hub").glob("models--*/blobs/*"))
    assert [p.name for s in snapshots for p in s.iterdir()] == ([archive] if keep else [])
    assert len(blobs) == (1 if keep else 0)
    listed = store.cached_models()
    assert [(m["name"], m["runtime"]) for m in listed] == [(repo_id, "coreml")] and listed[0]["size"] > 0
    assert store.remove(repo_id) > 0 and store.cached_models() == []


@pytest.mark.skipif(ON_A_MAC and not REAL, reason="on a Mac the rehearsal runs against the real Hub: set DIFFUSIOND_REAL_COREML")
@pytest.mark.parametrize("entry", CORE_ML, ids=[entry.alias for entry in CORE_ML])
def test_a_published_core_ml_model_pulls_loads_and_draws_a_png_without_torch(entry, tmp_path, monkeypatch, request) -> None:
    """The real daemon, with torch and diffusers unimportable (tests/fixtures/no_torch first on its
    path): it starts with the model as its default, so being ready means pulled and loaded; then a job."""
    if REAL and entry.alias != REAL:
        pytest.skip(f"macos.yml pulls {REAL} only")
    paths = [str(FIXTURES / "no_torch")] + ([] if REAL else [str(FIXTURES / "coreml_stand_in")])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
    if not REAL:  # macos.yml: the workflow's HF_HOME, kept between runs and shared with the next test
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    no_torch = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "ModuleNotFoundError" in no_torch.stderr
    hub = None
    if not REAL:
        hub = FakeHub({entry.repo: published_coreml_repo(entry.repo, tmp_path / "repo")}).__enter__()
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    daemon = Daemon(tmp_path / "daemon", model=entry.alias, compute_units=UNITS[entry.alias], runtime="coreml")
    try:
        daemon.start(wait=False).wait_ready(timeout=3600 if REAL else 120)
        job = daemon.call("submit", prompt="a lighthouse at dusk", steps=2, seed=3)["job"]["id"]
        done = daemon.wait_job(job, timeout=600 if REAL else 60)
        assert done["state"] == "done", (done, daemon.log.read_text()[-3000:])
        assert [Path(p).suffix for p in done["outputs"]] == [".png"]
        from PIL import Image

        assert Image.open(done["outputs"][0]).size == ((1024, 1024) if entry.repo in XL else (512, 512))
        # `diffuse models pull` goes through the downloader thread: torch-free too (cached by now)
        assert pull_events(daemon, entry.alias, UNITS[entry.alias])[-1]["type"] == Event.MODEL_DOWNLOADED
    finally:
        daemon.close()
        if hub is not None:
            hub.__exit__(None, None, None)
    if hub is not None:
        fetched = {r.path.split("/resolve/main/")[-1] for r in hub.requests if r.method == "GET" and "/resolve/" in r.path}
        _variant, wanted = coreml_layout.coreml_files(list(hub.repos[entry.repo].files), UNITS[entry.alias])
        assert fetched == set(wanted)  # the one variant; nothing else
        assert not list((tmp_path / "hf" / "hub").rglob("*.zip"))  # archives go once unpacked


# On a Mac (macos.yml): the published float16 model against the torch runtime on its diffusers
# original, same seed, same numpy noise. Core ML runs the model in float16 (the torch runtime here in
# float32 on the CPU) and 20 steps carry the difference along: a first setting, for the macOS job to
# confirm, of at most 6/255 on average per pixel channel.
MEAN_TOLERANCE = 6


@pytest.mark.skipif(not (ON_A_MAC and REAL), reason="needs Core ML and the real Hub: macos.yml sets DIFFUSIOND_REAL_COREML")
def test_the_real_published_model_draws_the_torch_runtimes_image(tmp_path) -> None:
    from diffusiond.daemon.engine.pipeline import Pipeline
    from diffusiond.daemon.config import Config
    from diffusiond.daemon.engine.runtimes import open_runtime
    from diffusiond.daemon.models import store
    from diffusiond.daemon.models.diffusers_folder import ModelFolder

    original = REAL.removesuffix("-coreml")  # sd15-coreml → sd15: the catalog's diffusers-format repo
    assert catalog.lookup(original) and catalog.lookup(original).runtime == "torch"
    store.pull(parse(REAL).canonical, False, lambda progress: None, compute_units="cpuAndGPU")
    store.pull(parse(original).canonical, False, lambda progress: None)
    request = Request("a lighthouse at dusk, oil painting", steps=20, seed=7, safety_checker=False)
    images = []
    for name, runtime in ((REAL, "coreml"), (original, "torch")):
        model = ModelFolder.open(name)
        config = Config(runtime=runtime, device="cpu", compute_units="cpuAndGPU", state_dir=tmp_path)
        pipeline = Pipeline(model, open_runtime(model, config, False))
        images.append(pipeline.generate(request).images[0].astype(int))
        del pipeline  # the runner has 7 GB: one model at a time
    difference = np.abs(images[0] - images[1])
    assert difference.mean() <= MEAN_TOLERANCE, (difference.mean(), difference.max())
