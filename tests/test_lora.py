"""LoRAs: what a file holds, per-job application on the torch runtime against diffusers' own
``load_lora_weights`` + ``fuse_lora``, A1111's prompt tags and infotext, and the daemon end to end.

The LoRA files are made here, for the shipped tiny SD model and the tiny SDXL of test_sdxl.py:

* diffusers/PEFT: PEFT adapters (``LoraConfig`` on the attention projections) added to the
  modules, written by diffusers' ``save_lora_weights`` from ``get_peft_model_state_dict``, as
  diffusers' examples/text_to_image/train_text_to_image_lora.py saves them. ``init_lora_weights``
  is off so that B is not zero and the LoRA changes the image.
* kohya: the keys kohya-ss/sd-scripts networks/lora.py writes: ``LORA_PREFIX_UNET`` "lora_unet",
  ``LORA_PREFIX_TEXT_ENCODER`` "lora_te" (SD) or "lora_te1"/"lora_te2" (SDXL), then the module's
  path with "." turned into "_" (``lora_name.replace(".", "_")``), for the Linear layers inside
  Transformer2DModel (UNet) and CLIPAttention/CLIPMLP (text encoders); tensors ``.lora_down.weight``
  (rank × in), ``.lora_up.weight`` (out × rank) and ``.alpha``. SDXL's UNet is named as sd-scripts'
  sdxl_original_unet.py names it (Stability's input_blocks.N.1 / middle_block.1 / output_blocks.N.1).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import transformers.integrations.peft
from diffusiond.clients.infotext import job_settings, parse_infotext
from diffusiond.daemon.engine.pipeline import Pipeline, Request, resolve
from diffusiond.daemon.engine.png import infotext
from diffusiond.daemon.engine.runtimes.torch_runtime import TorchRuntime
from diffusiond.daemon.errors import InvalidParameter
from diffusiond.daemon.models import lora
from diffusiond.daemon.models.catalog import TINY
from diffusiond.daemon.models.diffusers_folder import ModelFolder
from diffusiond.daemon.models.family import SD, SDXL

from .test_sdxl import folders  # noqa: F401  (the tiny SDXL models, a fixture)

PROMPT = "a lighthouse at dusk"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def peft_lora(folder: Path, out: Path, sdxl: bool, rank: int = 4, seed: int = 0) -> Path:
    """A diffusers/PEFT LoRA file for the model in ``folder`` (UNet and text encoders)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=list(ATTENTION)))
    layers = {"unet_lora_layers": get_peft_model_state_dict(unet)}
    encoders = [("text_encoder", CLIPTextModel)] + ([("text_encoder_2", CLIPTextModelWithProjection)] if sdxl else [])
    for part, kind in encoders:
        encoder = kind.from_pretrained(folder / part)
        encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        layers[f"{part}_lora_layers"] = get_peft_model_state_dict(encoder)
    writer = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    writer.save_lora_weights(out.parent, weight_name=out.name, **layers)
    return out


def _sgm(path: str, layers_per_block: int) -> str:
    """A diffusers UNet attention path in Stability's naming, as kohya's SDXL LoRAs use it."""
    down = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path)
    if down:
        block, layer, rest = int(down[1]), int(down[2]), down[3]
        return f"input_blocks.{1 + block * (layers_per_block + 1) + layer}.1.{rest}"
    up = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path)
    if up:
        block, layer, rest = int(up[1]), int(up[2]), up[3]
        return f"output_blocks.{block * (layers_per_block + 1) + layer}.1.{rest}"
    return re.sub(r"^mid_block\.attentions\.0\.", "middle_block.1.", path)


def kohya_lora(folder: Path, out: Path, sdxl: bool, rank: int = 4, seed: int = 1) -> Path:
    """A kohya-format LoRA file for the model in ``folder``, keys as sd-scripts writes them."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def add(prefix: str, path: str, module: torch.nn.Linear) -> None:
        name = f"{prefix}.{path}".replace(".", "_")
        state[f"{name}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.2
        state[f"{name}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.2
        state[f"{name}.alpha"] = torch.tensor(rank / 2)

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    for path, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".transformer_blocks." in path and path.endswith(ATTENTION):
            add("lora_unet", _sgm(path, unet.config.layers_per_block) if sdxl else path, module)
    encoders = [("lora_te1", "text_encoder"), ("lora_te2", "text_encoder_2")] if sdxl else [("lora_te", "text_encoder")]
    for prefix, part in encoders:
        for path, module in CLIPTextModel.from_pretrained(folder / part).named_modules():
            if isinstance(module, torch.nn.Linear) and path.endswith(CLIP_LAYERS):
                # sd-scripts' CLIPTextModel has its layers under text_model. (transformers 5 flattened it)
                add(prefix, path if path.startswith("text_model.") else f"text_model.{path}", module)
    save_file(state, str(out), metadata={"ss_network_module": "networks.lora"})
    return out


@pytest.fixture(scope="module", autouse=True)
def peft_release(request):
    """transformers 5.24's PEFT integration (add_adapter, load_adapter: what diffusers' reference
    loading and PEFT-format writing call for text encoders) asks for peft 0.22, which is not
    published; PyPI's newest, 0.21.2, does the work. The reference lifts the check for this module."""
    patch = pytest.MonkeyPatch()
    patch.setattr(transformers.integrations.peft, "check_peft_version", lambda min_version: None)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def files(tmp_path_factory, folders) -> dict[str, Path]:  # noqa: F811
    """LoRA files in a LoRA folder: per family, one of each format."""
    root = tmp_path_factory.mktemp("loras")
    return {
        "sd-diffusers": peft_lora(TINY, root / "sd-diffusers.safetensors", sdxl=False),
        "sd-kohya": kohya_lora(TINY, root / "sd-kohya.safetensors", sdxl=False),
        "sdxl-diffusers": peft_lora(folders["base"], root / "sdxl-diffusers.safetensors", sdxl=True),
        "sdxl-kohya": kohya_lora(folders["base"], root / "sdxl-kohya.safetensors", sdxl=True),
    }


@pytest.fixture(scope="module")
def lora_dir(files) -> Path:
    return files["sd-diffusers"].parent


@pytest.fixture(scope="module")
def pipelines(folders, lora_dir) -> dict[str, Pipeline]:  # noqa: F811
    """Our pipelines on the tiny SD and SDXL, kept warm across the tests as the daemon keeps them."""
    sd = ModelFolder.open("tiny")
    sdxl = ModelFolder.open(str(folders["base"]))
    return {SD: Pipeline(sd, TorchRuntime(sd.path, "cpu"), lora_dir=lora_dir),
            SDXL: Pipeline(sdxl, TorchRuntime(sdxl.path, "cpu"), lora_dir=lora_dir)}


def reference(folder: Path, sdxl: bool, loras: list[tuple[Path, float]]):
    """diffusers' own pipeline with the LoRAs loaded by load_lora_weights and fused by fuse_lora."""
    kind = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra = {"add_watermarker": False} if sdxl else {"safety_checker": None}
    pipe = kind.from_pretrained(folder, **extra).to("cpu")
    names = [f"l{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    if loras:
        pipe.set_adapters(names, [weight for _, weight in loras])
        pipe.fuse_lora(adapter_names=names)
    return pipe


SETTINGS = {SD: dict(width=64, height=64, steps=6), SDXL: dict(width=96, height=64, steps=5)}


def ours(pipelines: dict[str, Pipeline], family: str, prompt: str = PROMPT, **fields) -> np.ndarray:
    request = Request(prompt, seed=11, rng="torch", scheduler="euler", guidance_scale=5.0, **SETTINGS[family], **fields)
    return pipelines[family].generate(request).images[0]


def theirs(pipe, family: str, prompt: str = PROMPT) -> np.ndarray:
    from diffusers import EulerDiscreteScheduler

    settings = SETTINGS[family]
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    image = pipe(prompt, num_inference_steps=settings["steps"], guidance_scale=5.0, width=settings["width"],
                 height=settings["height"], generator=torch.Generator().manual_seed(11), output_type="np").images[0]
    return np.round(image * 255).astype(np.uint8)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# What a file holds


@pytest.mark.parametrize("key, fmt, family, parts", [
    ("sd-diffusers", lora.DIFFUSERS, SD, ("unet", "text_encoder")),
    ("sd-kohya", lora.KOHYA, SD, ("unet", "text_encoder")),
    ("sdxl-diffusers", lora.DIFFUSERS, SDXL, ("unet", "text_encoder", "text_encoder_2")),
    ("sdxl-kohya", lora.KOHYA, SDXL, ("unet", "text_encoder", "text_encoder_2")),
])
def test_a_file_says_its_format_family_rank_and_a1111s_hash(files, key, fmt, family, parts) -> None:
    info = lora.inspect(files[key])
    assert (info.name, info.format, info.family, info.rank, info.parts) == (key, fmt, family, 4, parts)
    data = files[key].read_bytes()
    (header,) = struct.unpack("<Q", data[:8])
    # A1111: sha256 of the bytes after the header, its first 12 hex digits — not the whole file's.
    assert info.hash == hashlib.sha256(data[8 + header:]).hexdigest()[:12]
    assert info.hash != hashlib.sha256(data).hexdigest()[:12]
    assert info.size == len(data)


def test_the_hash_kohya_wrote_into_the_metadata_is_the_one_a1111_shows(tmp_path) -> None:
    """A1111's NetworkOnDisk takes the metadata's sshs_model_hash before computing one."""
    path = tmp_path / "stamped.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32)}, str(path),
              metadata={"sshs_model_hash": "0123456789abcdef" * 4})
    assert lora.inspect(path).hash == "0123456789ab"


@pytest.mark.parametrize("key, kind", [("hada_w1_a", "LoHa"), ("lokr_w1", "LoKr"), ("oft_blocks", "OFT")])
def test_lycoris_networks_are_refused_naming_the_file_and_the_type(tmp_path, key, kind) -> None:
    path = tmp_path / f"{kind}.safetensors"
    save_file({f"lora_unet_down_blocks_0_attentions_0_proj_in.{key}": torch.zeros(2, 2)}, str(path))
    with pytest.raises(InvalidParameter) as refused:
        lora.inspect(path)
    assert refused.value.field == "loras" and str(path) in str(refused.value) and kind in str(refused.value)


def test_a_file_of_no_lora_weights_and_a_file_of_no_safetensors_are_refused(tmp_path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(checkpoint))
    with pytest.raises(InvalidParameter, match="holds no LoRA weights"):
        lora.inspect(checkpoint)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 20)
    with pytest.raises(InvalidParameter, match="not a safetensors file"):
        lora.inspect(junk)


def test_the_folder_lists_every_file_and_why_one_cannot_be_applied(files, tmp_path) -> None:
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    (folder / "styles" / "ink.safetensors").write_bytes(files["sd-kohya"].read_bytes())
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(folder / "loha.safetensors"))
    listed = {entry["name"]: entry for entry in lora.listing(folder)}
    assert listed["styles/ink"]["family"] == SD and listed["styles/ink"]["rank"] == 4
    assert "LoHa" in str(listed["loha"]["error"])
    assert lora.find("styles/ink", folder) == folder / "styles" / "ink.safetensors"
    with pytest.raises(InvalidParameter, match="may not leave it"):
        lora.find("styles/../../loras/loha", folder)
    with pytest.raises(InvalidParameter, match="no LoRA 'nope'"):
        lora.find("nope", folder)


# The prompt's tags and the job's list


def test_prompt_tags_name_loras_weight_one_by_default_and_leave_the_encoded_text() -> None:
    prompt = "a cat <lora:ink:0.8>, sitting <lora:styles/watercolor>"
    assert lora.prompt_tags(prompt) == [("ink", 0.8), ("styles/watercolor", 1.0)]
    assert lora.strip_tags(prompt) == "a cat , sitting "
    for bad in ("<lora::0.5>", "<lora:ink:heavy>", "<lora:ink:0.5:0.7>"):
        with pytest.raises(InvalidParameter, match="prompt"):
            lora.prompt_tags(bad)


def test_bad_lists_and_weights_are_refused_naming_the_field(pipelines, lora_dir) -> None:
    model = pipelines[SD].model
    for loras, message in [((("sd-kohya", 11.0),), "from -10 to 10"), ((("sd-kohya", 1.0), ("sd-kohya", 0.5)), "twice"),
                           ((("nope", 1.0),), "no LoRA 'nope'"), (("sd-kohya",), "list of {name, weight}")]:
        with pytest.raises(InvalidParameter, match=re.escape(message)) as refused:
            resolve(Request(PROMPT, loras=loras), model, lora_dir=lora_dir)  # type: ignore[arg-type]
        assert refused.value.field == "loras"


def test_a_lora_of_the_other_family_is_refused_naming_both(pipelines, lora_dir) -> None:
    with pytest.raises(InvalidParameter, match="an SDXL LoRA, and tiny is an SD 1.x/2.x model"):
        resolve(Request(f"{PROMPT} <lora:sdxl-kohya>"), pipelines[SD].model, lora_dir=lora_dir)
    with pytest.raises(InvalidParameter, match="an SD 1.x/2.x LoRA"):
        resolve(Request(PROMPT, loras=(("sd-diffusers", 1.0),)), pipelines[SDXL].model, lora_dir=lora_dir)


# Applied per job, against diffusers


@pytest.mark.parametrize("key", ["sd-diffusers", "sd-kohya", "sdxl-diffusers", "sdxl-kohya"])
def test_a_lora_matches_diffusers_load_lora_weights_and_fuse_lora(key, files, folders, pipelines) -> None:  # noqa: F811
    family = SDXL if key.startswith("sdxl") else SD
    folder = folders["base"] if family == SDXL else TINY
    expected = theirs(reference(folder, family == SDXL, [(files[key], 0.7)]), family)
    base = ours(pipelines, family)
    image = ours(pipelines, family, f"{PROMPT} <lora:{key}:0.7>")
    for network in (pipelines[family].runtime.unet, *pipelines[family].runtime.text_encoders):
        assert any("lora_A" in name for name, _ in network.named_parameters())  # each part took its layers
    assert max_diff(image, expected) <= 2
    assert max_diff(image, base) > 2  # the LoRA does change the image


def test_two_loras_at_once_match_diffusers(files, pipelines) -> None:
    expected = theirs(reference(TINY, False, [(files["sd-diffusers"], 0.6), (files["sd-kohya"], 0.9)]), SD)
    image = ours(pipelines, SD, loras=(("sd-diffusers", 0.6),), prompt=f"{PROMPT} <lora:sd-kohya:0.9>")
    assert max_diff(image, expected) <= 2


def test_weight_zero_is_no_lora_and_a_job_without_one_after_is_the_base_image(pipelines) -> None:
    runtime = pipelines[SD].runtime
    base = ours(pipelines, SD)
    assert np.array_equal(ours(pipelines, SD, loras=(("sd-kohya", 0.0),)), base)
    with_lora = ours(pipelines, SD, loras=(("sd-kohya", 1.0),))
    assert max_diff(with_lora, base) > 2
    assert np.array_equal(ours(pipelines, SD), base)  # nothing left applied
    assert runtime._adapters == [] and not any("lora" in name for name, _ in runtime.unet.named_parameters())


def test_the_same_set_stays_applied_and_another_replaces_it(pipelines, monkeypatch) -> None:
    runtime = pipelines[SD].runtime
    calls: list[tuple] = []
    original = runtime.set_loras
    monkeypatch.setattr(runtime, "set_loras", lambda loras: (calls.append(tuple(loras)), original(loras))[1])
    first = ours(pipelines, SD, loras=(("sd-kohya", 0.5),))
    assert np.array_equal(ours(pipelines, SD, loras=(("sd-kohya", 0.5),)), first)
    assert len(calls) == 1  # the second job found it applied
    ours(pipelines, SD, loras=(("sd-diffusers", 0.5),))
    assert len(calls) == 2 and len(runtime._adapters) == 1
    ours(pipelines, SD)
    assert runtime._adapters == []


def test_a_lora_that_fits_no_layer_is_refused_and_leaves_nothing_applied(pipelines, tmp_path) -> None:
    """Right family by its names, wrong shapes: diffusers' loading fails; the file is named."""
    path = tmp_path / "wide.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 99),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(16, 4),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 4)}, str(path))
    base = ours(pipelines, SD)
    with pytest.raises(InvalidParameter, match=re.escape(str(path))):
        ours(pipelines, SD, loras=((str(path), 1.0),))
    assert np.array_equal(ours(pipelines, SD), base)


# The PNG's infotext, as A1111 writes it


def test_infotext_keeps_the_tags_adds_the_lists_and_records_lora_hashes(files, pipelines, lora_dir) -> None:
    r = resolve(Request(f"{PROMPT} <lora:sd-kohya:0.7>", seed=3, loras=(("sd-diffusers", 0.5),)), pipelines[SD].model,
                lora_dir=lora_dir)
    info = parse_infotext(infotext(r, "tiny"))
    assert info.prompt == f"{PROMPT} <lora:sd-kohya:0.7> <lora:sd-diffusers:0.5>"
    hashes = {f: lora.inspect(files[f]).hash for f in ("sd-kohya", "sd-diffusers")}
    assert info.params["Lora hashes"] == f"sd-kohya: {hashes['sd-kohya']}, sd-diffusers: {hashes['sd-diffusers']}"
    settings, unknown = job_settings(info)
    assert unknown == [] and "loras" not in settings and settings.pop("model") == "tiny"
    again = resolve(Request(settings["prompt"]), pipelines[SD].model, lora_dir=lora_dir)  # --reuse: the tags bring them back
    assert sorted((u.file.name, u.weight) for u in again.loras) == [("sd-diffusers", 0.5), ("sd-kohya", 0.7)]
    assert "Lora hashes" not in infotext(resolve(Request(PROMPT, seed=3), pipelines[SD].model, lora_dir=lora_dir), "tiny")


# End to end: `diffuse` through the real daemon


def test_diffuse_applies_a_lora_named_in_the_prompt_through_the_daemon(files, tmp_path) -> None:
    """`diffuse "a cat <lora:tiny:0.7>"`: the PNG keeps the tag and records A1111's `Lora hashes`;
    --lora gives the same image, a job without one the base image, --reuse the LoRA's image again."""
    import subprocess
    import sys

    from PIL import Image

    from diffusiond.clients.pngtext import read_text

    from .daemon_process import Daemon

    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "tiny.safetensors").write_bytes(files["sd-kohya"].read_bytes())
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, str(folder / "loha.safetensors"))
    with Daemon(tmp_path / "daemon", lora_dir=str(folder)) as daemon:
        def diffuse(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(daemon.runtime_dir),
                                   *args], capture_output=True, text=True, timeout=300)

        def pixels(path: str) -> np.ndarray:
            with Image.open(path) as image:
                return np.asarray(image)

        common = ("--steps", "3", "--seed", "5")
        tagged = diffuse("a cat <lora:tiny:0.7>", *common, "-o", str(tmp_path / "a"))
        assert tagged.returncode == 0, tagged.stderr
        (first,) = tagged.stdout.split()
        info = parse_infotext(read_text(first)["parameters"])
        assert info.prompt == "a cat <lora:tiny:0.7>"
        assert info.params["Lora hashes"] == f"tiny: {lora.inspect(folder / 'tiny.safetensors').hash}"

        listed = diffuse("a cat", *common, "--lora", "tiny:0.7", "-o", str(tmp_path / "b"))
        assert listed.returncode == 0, listed.stderr
        assert np.array_equal(pixels(listed.stdout.split()[0]), pixels(first))
        assert parse_infotext(read_text(listed.stdout.split()[0])["parameters"]).prompt == "a cat <lora:tiny:0.7>"

        plain = diffuse("a cat", *common, "-o", str(tmp_path / "c"))
        assert plain.returncode == 0, plain.stderr
        assert max_diff(pixels(plain.stdout.split()[0]), pixels(first)) > 2

        again = diffuse("--reuse", first, "-o", str(tmp_path / "d"))
        assert again.returncode == 0, again.stderr
        assert np.array_equal(pixels(again.stdout.split()[0]), pixels(first))

        shown = diffuse("loras")
        assert shown.returncode == 0, shown.stderr
        assert re.search(r"tiny\s+SD 1.x/2.x\s+rank 4", shown.stdout) and "LoHa" in shown.stdout

        refused = diffuse("a cat <lora:loha>")
        assert refused.returncode == 2 and "loha.safetensors: a LyCORIS LoHa network" in refused.stderr
        missing = diffuse("a cat", "--lora", "nope")
        assert missing.returncode == 2 and "no LoRA 'nope'" in missing.stderr
        bad_weight = diffuse("a cat", "--lora", "tiny:strong")
        assert bad_weight.returncode == 2 and "the weight after ':' must be a number, such as tiny:0.8" in bad_weight.stderr

        # The hot folder's --lora goes on every file's job.
        hot = tmp_path / "hot"
        hot.mkdir()
        (hot / "cat.txt").write_text("a cat\nSteps: 3, Seed: 5\n")
        watcher = subprocess.Popen([sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(daemon.runtime_dir),
                                    "hotfolder", str(hot), "--settle", "0.2", "--lora", "tiny:0.7"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not (hot / "done" / "cat.txt").exists():  # polled, as tests/test_hotfolder.py waits for a file
                assert time.monotonic() < deadline and watcher.poll() is None, "the hot folder did not finish the file"
                time.sleep(0.05)
        finally:
            watcher.terminate()
            watcher.wait(timeout=30)
        assert np.array_equal(pixels(str(hot / "out" / "cat.png")), pixels(first))


def test_a_hub_lora_is_downloaded_by_its_job_then_applied(files, tmp_path, monkeypatch) -> None:
    """ORG/REPO/FILE.safetensors: accepted at submit though not cached, fetched with the model
    download events as the job's first phase (tests/fake_hub.py serves it), then the same image as
    the file given by its path."""
    import subprocess
    import sys

    from PIL import Image

    from diffusiond.clients.pngtext import read_text

    from .daemon_process import Daemon
    from .fake_hub import FakeHub

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "ink.safetensors").write_bytes(files["sd-kohya"].read_bytes())
    with FakeHub({"someone/loras": repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        with Daemon(tmp_path / "daemon", lora_dir=str(tmp_path / "none")) as daemon:
            def diffuse(*args: str) -> subprocess.CompletedProcess:
                return subprocess.run([sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir",
                                       str(daemon.runtime_dir), "a cat", "--steps", "3", "--seed", "5", *args],
                                      capture_output=True, text=True, timeout=300)

            events = daemon.subscribe(b"model.someone/loras/ink.safetensors")
            fetched = diffuse("--lora", "someone/loras/ink.safetensors:0.7", "-o", str(tmp_path / "a"))
            assert fetched.returncode == 0, fetched.stderr
            seen = daemon.wait_for(events, lambda event: event["type"] == "model.downloaded")
            assert Path(seen["path"]).read_bytes() == files["sd-kohya"].read_bytes()
            by_path = diffuse("--lora", f"{files['sd-kohya']}:0.7", "-o", str(tmp_path / "b"))
            assert by_path.returncode == 0, by_path.stderr
            with Image.open(fetched.stdout.split()[0]) as first, Image.open(by_path.stdout.split()[0]) as second:
                assert np.array_equal(np.asarray(first), np.asarray(second))
            params = parse_infotext(read_text(fetched.stdout.split()[0])["parameters"]).params
            assert params["Lora hashes"] == f"someone/loras/ink.safetensors: {lora.inspect(files['sd-kohya']).hash}"
            gone = diffuse("--lora", "someone/loras/nope.safetensors")
            assert gone.returncode == 1 and "has no file 'nope.safetensors'" in gone.stderr


# Core ML: LoRAs merged into a conversion of the source, once per set


@pytest.fixture(scope="module")
def core_ml_base(tmp_path_factory) -> Path:
    """The tiny model converted as `diffusiond convert` does (its diffusiond.json names the source)."""
    from diffusiond.daemon.coreml.converter import convert

    return convert("tiny", tmp_path_factory.mktemp("coreml") / "tiny", "original", progress=lambda _: None)


def weights(folder: Path, part: str) -> bytes:
    """An mlprogram package's weight file (Data/com.apple.CoreML/weights/weight.bin)."""
    (package,) = folder.glob(f"*_{part}.mlpackage")
    return (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").read_bytes()


def test_a_core_ml_jobs_loras_are_merged_into_one_conversion_that_later_jobs_reuse(core_ml_base, lora_dir,
                                                                                    tmp_path) -> None:
    from diffusiond.daemon.coreml.merged_models import cache_key, merged_model
    from diffusiond.daemon.engine.pipeline import lora_key
    from diffusiond.daemon.models.coreml_folder import CoreMLFolder

    base = CoreMLFolder.open(core_ml_base, "tiny-coreml")
    prompt = f"{PROMPT} <lora:sd-kohya:0.7>"
    resolve(Request(prompt), base, lora_dir=lora_dir)  # accepted: its source is known, the daemon converts
    uses = lora.job_loras(prompt, (), lora_dir)
    lines: list[str] = []
    merged = merged_model(base, uses, tmp_path, lines.append)
    assert any(line.startswith("merging sd-kohya") for line in lines) and any("Unet" in line for line in lines)
    for part in ("text_encoder", "unet"):  # what the LoRA trains
        assert weights(merged, part) != weights(core_ml_base, part)
    assert weights(merged, "vae_decoder") == weights(core_ml_base, "vae_decoder")  # what it does not
    model = CoreMLFolder.open(merged, "merged")
    assert model.merged_loras == lora_key(uses) and model.source == "tiny"
    assert resolve(Request(prompt, seed=1), model, lora_dir=lora_dir).loras[0].weight == 0.7
    again: list[str] = []
    assert merged_model(base, uses, tmp_path, again.append) == merged and again == []  # the cache: no conversion
    assert cache_key(base, lora.job_loras(f"{PROMPT} <lora:sd-kohya:0.5>", (), lora_dir)) != cache_key(base, uses)


def test_a_core_ml_model_of_unknown_source_says_a_lora_needs_the_diffusers_base(core_ml_base, lora_dir,
                                                                                tmp_path) -> None:
    """Apple's Core ML repos do not say what they were converted from."""
    from diffusiond.daemon.models.coreml_folder import CoreMLFolder

    apple = tmp_path / "apple"
    shutil.copytree(core_ml_base, apple)
    facts = json.loads((apple / "diffusiond.json").read_text())
    del facts["source"]
    (apple / "diffusiond.json").write_text(json.dumps(facts))
    with pytest.raises(InvalidParameter, match=r"only as Core ML.*`diffuse models pull sd15`.*--lora FILE:WEIGHT"):
        resolve(Request(f"{PROMPT} <lora:sd-kohya>"), CoreMLFolder.open(apple, "sd15-coreml"), lora_dir=lora_dir)


def test_diffusiond_convert_lora_merges_and_records_it(files, tmp_path) -> None:
    import subprocess
    import sys

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "diffusiond.daemon.cli", "convert", "tiny", "--out", str(out),
                           "--parts", "TextEncoder", "--lora", f"{files['sd-kohya']}:0.6"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    recorded = json.loads((out / "diffusiond.json").read_text())["loras"]
    assert recorded == [{"name": str(files["sd-kohya"]), "hash": lora.inspect(files["sd-kohya"]).hash, "weight": 0.6}]


def test_the_worker_converts_a_core_ml_jobs_loras_once_then_runs_every_such_job_on_it(core_ml_base, lora_dir,
                                                                                     tmp_path, monkeypatch) -> None:
    """WarmModels, as the daemon's worker runs a job: the first job with the set converts (with
    `model.converting` events) and loads the result, the second finds it converted. Core ML's load
    and predict are test_coreml.py's SpecStandIn (NOT Core ML: it checks each feed against the
    converted package's declared inputs and answers zeros); everything else is the daemon's."""
    from diffusiond.daemon.config import Config
    from diffusiond.daemon.engine.runtimes import coreml_runtime
    from diffusiond.daemon.service.warm import WarmModels

    from .test_coreml import SpecStandIn

    monkeypatch.setattr(coreml_runtime, "_load", lambda path, units, name: SpecStandIn(path, 0.0))
    events: list[dict] = []
    config = Config(state_dir=tmp_path / "state", lora_dir=lora_dir, compute_units="cpuAndGPU", max_loaded=2)
    models = WarmModels(config, lambda topic, body: events.append(body))
    request = Request(f"{PROMPT} <lora:sd-kohya:0.7>", steps=2, seed=1)
    result = models.generate(str(core_ml_base), request, None, lambda: False)
    kinds = [event["type"] for event in events]
    assert "model.converting" in kinds and kinds.index("model.converted") < len(kinds) - 1
    (merged,) = [name for name in models.loaded if "coreml-loras" in name]
    assert "Lora hashes: \"sd-kohya: " in infotext(result.request, str(core_ml_base))
    events.clear()
    models.generate(str(core_ml_base), request, None, lambda: False)
    assert not [event for event in events if event["type"] in ("model.converting", "model.loading")]
    assert merged in models.loaded
