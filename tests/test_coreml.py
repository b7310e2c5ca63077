"""Core ML: the converter on the real tiny model, the runtime's feeds against the converted specs,
compute units (the rule and the bench's winner). Running the models needs a Mac: those tests are
at the end and run in .github/workflows/macos.yml."""

from __future__ import annotations

import json
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from diffusiond.daemon.coreml import compute_units
from diffusiond.daemon.coreml.hardware import parse_sysctl
from diffusiond.daemon.engine.pipeline import Request, resolve
from diffusiond.daemon.engine.runtimes import Conditioning
from diffusiond.daemon.engine.runtimes import coreml_runtime as cr
from diffusiond.daemon.errors import InvalidParameter, ModelInvalid
from diffusiond.daemon.models.catalog import TINY
from diffusiond.daemon.models.coreml_folder import CoreMLFolder, Description, Port, description_from_metadata, find_parts
from diffusiond.daemon.models.diffusers_folder import ModelFolder

import coremltools as ct  # noqa: E402  (the dev extra installs it)

from . import build_tiny_sdxl
ON_APPLE_SILICON = sys.platform == "darwin" and platform.machine() == "arm64"
needs_a_mac = pytest.mark.skipif(not ON_APPLE_SILICON, reason="Core ML runs models on macOS on Apple silicon only")

PARTS = ("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, list[str]]:
    """The shipped tiny model converted once, with split_einsum attention (the default; `original` is
    diffusers' own attention, converted in the macOS tests), and the progress lines."""
    from diffusiond.daemon.coreml.converter import convert

    lines: list[str] = []
    out = convert("tiny", tmp_path_factory.mktemp("coreml") / "tiny", "split_einsum", progress=lines.append)
    return out, lines


def spec_ports(package: Path) -> Description:
    """The ports straight from the saved spec with coremltools' own reader (not ours)."""
    from coremltools.proto import FeatureTypes_pb2

    kinds = {FeatureTypes_pb2.ArrayFeatureType.FLOAT32: "float32", FeatureTypes_pb2.ArrayFeatureType.FLOAT16: "float16"}
    spec = ct.utils.load_spec(str(package))

    def ports(features) -> tuple[Port, ...]:
        return tuple(Port(f.name, tuple(f.type.multiArrayType.shape), kinds[f.type.multiArrayType.dataType]) for f in features)

    return Description(ports(spec.description.input), ports(spec.description.output))


def tiny_config(part: str) -> dict:
    return json.loads((TINY / part / "config.json").read_text())


def test_the_converter_writes_apples_layout_and_reports_each_part(converted) -> None:
    out, lines = converted
    assert sorted(p.name for p in out.glob("*.mlpackage")) == sorted(
        f"Stable_Diffusion_version_tiny_{suffix}.mlpackage" for suffix in ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    )
    assert (out / "vocab.json").read_bytes() == (TINY / "tokenizer" / "vocab.json").read_bytes()
    assert (out / "merges.txt").read_bytes() == (TINY / "tokenizer" / "merges.txt").read_bytes()
    assert [line.split(":")[0] for line in lines if " in " in line] == [f"[{i}/4] {part}" for i, part in enumerate(PARTS, 1)]


def test_each_converted_spec_has_the_contract(converted) -> None:
    out, _ = converted
    unet, vae, text = tiny_config("unet"), tiny_config("vae"), tiny_config("text_encoder")
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    latent, size, hidden = unet["sample_size"], unet["sample_size"] * factor, text["hidden_size"]
    expected = {
        "text_encoder": ([("input_ids", (1, 77))], [("last_hidden_state", (1, 77, hidden))]),
        "unet": ([("sample", (2, 4, latent, latent)), ("timestep", (2,)), ("encoder_hidden_states", (2, hidden, 1, 77))],
                 [("noise_pred", (2, 4, latent, latent))]),
        "vae_decoder": ([("z", (1, 4, latent, latent))], [("image", (1, 3, size, size))]),
        "vae_encoder": ([("x", (1, 3, size, size))], [("latent", (1, 8, latent, latent))]),
    }
    for suffix, (inputs, outputs) in expected.items():
        ports = spec_ports(out / f"Stable_Diffusion_version_tiny_{suffix}.mlpackage")
        assert [(p.name, p.shape, p.dtype) for p in ports.inputs] == [(n, s, "float32") for n, s in inputs], suffix
        assert [(p.name, p.shape, p.dtype) for p in ports.outputs] == [(n, s, "float32") for n, s in outputs], suffix


def test_a_converted_folder_opens_with_the_diffusers_models_facts(converted) -> None:
    out, _ = converted
    model, original = ModelFolder.open(str(out)), ModelFolder.open("tiny")
    assert isinstance(model, CoreMLFolder) and model.runtime == "coreml"
    for fact in ("vae_scale_factor", "latent_channels", "default_shape", "scaling_factor", "scheduler_config"):
        assert getattr(model, fact) == getattr(original, fact), fact
    from diffusiond.daemon.engine.tokenizer import Tokenizer

    prompt = "a lighthouse at dusk, oil painting"
    assert (Tokenizer(model.tokenizer_dirs[0]).encode(prompt).ids == Tokenizer(original.tokenizer_dirs[0]).encode(prompt).ids).all()


def test_a_portrait_conversion_takes_and_asks_for_its_own_size(converted, tmp_path) -> None:
    """Non-square: the Unet and VAE decoder converted again at 192x256 (width x height) into a copy."""
    import shutil

    from diffusiond.daemon.coreml.converter import convert

    folder = tmp_path / "portrait"
    shutil.copytree(converted[0], folder)
    convert("tiny", folder, "original", (192, 256), parts=("Unet", "VAEDecoder"), progress=lambda _: None)
    model = ModelFolder.open(str(folder))
    assert model.default_shape == (192, 256)
    unet = spec_ports(model.parts["Unet"])
    assert unet.input("sample").shape == (2, 4, 32, 24) and unet.output("noise_pred").shape == (2, 4, 32, 24)
    assert spec_ports(model.parts["VAEDecoder"]).output("image").shape == (1, 3, 256, 192)
    request = resolve(Request("a tall lighthouse"), model)
    assert (request.width, request.height) == (192, 256)
    with pytest.raises(InvalidParameter, match="converted for 192x256"):
        resolve(Request("a wide one", width=256, height=192), model)
    sample = np.zeros((2, 4, 32, 24), np.float32)
    (feed, real), = cr.unet_inputs(model.descriptions["Unet"], sample, np.float32(1), Conditioning(np.zeros((2, 77, 32), np.float32)))
    assert real == 2 and {k: v.shape for k, v in feed.items()} == {p.name: p.shape for p in unet.inputs}


def test_the_runtime_feeds_are_exactly_what_the_specs_declare(converted) -> None:
    out, _ = converted
    model = ModelFolder.open(str(out))
    declared = {part: spec_ports(path) for part, path in model.parts.items()}
    rng = np.random.default_rng(0)
    count = 3  # guided: 6 UNet rows → three feeds of the declared two
    ids = rng.integers(0, 2000, (2, 77)).astype(np.int64)
    sample = rng.standard_normal((2 * count, 4, 32, 32), dtype=np.float32)
    hidden = rng.standard_normal((2 * count, 77, 32), dtype=np.float32)
    feeds = {
        "TextEncoder": list(cr.text_encoder_inputs(model.descriptions["TextEncoder"], ids)),
        "Unet": list(cr.unet_inputs(model.descriptions["Unet"], sample, np.float32(981), Conditioning(hidden))),
        "VAEDecoder": list(cr.batches(model.descriptions["VAEDecoder"], {"z": sample[:count]})),
        "VAEEncoder": list(cr.batches(model.descriptions["VAEEncoder"], {"x": rng.standard_normal((1, 3, 256, 256))})),
    }
    assert [len(feeds[p]) for p in PARTS] == [2, 3, 3, 1]
    for part, part_feeds in feeds.items():
        for feed, _real in part_feeds:
            assert {name: (a.shape, a.dtype.name) for name, a in feed.items()} == {
                p.name: (p.shape, p.dtype) for p in declared[part].inputs}, part
    first = feeds["Unet"][0][0]
    assert np.array_equal(first["encoder_hidden_states"][1, :, 0, :], hidden[1].T)
    assert np.array_equal(first["timestep"], [981, 981])
    assert np.array_equal(feeds["TextEncoder"][1][0]["input_ids"], ids[1:2].astype(np.float32))


def test_a_short_batch_is_padded_and_the_padding_dropped(converted) -> None:
    out, _ = converted
    unet = ModelFolder.open(str(out)).descriptions["Unet"]
    sample = np.ones((1, 4, 32, 32), np.float32)  # guidance ≤ 1: one row for a UNet that takes two
    [(feed, real)] = cr.unet_inputs(unet, sample, np.float32(1), Conditioning(np.zeros((1, 77, 32), np.float32)))
    assert real == 1 and feed["sample"].shape == (2, 4, 32, 32)
    prediction = {"noise_pred": np.stack([np.full((4, 32, 32), 7.0), np.full((4, 32, 32), -1.0)])}
    assert np.array_equal(cr.joined([(prediction, real)], "noise_pred"), np.full((1, 4, 32, 32), 7.0, np.float32))


def test_a_size_the_model_was_not_converted_for_is_refused(converted) -> None:
    out, _ = converted
    model = ModelFolder.open(str(out))
    assert resolve(Request("x"), model).width == 256
    with pytest.raises(InvalidParameter, match="converted for 256x256"):
        resolve(Request("x", width=512, height=512), model)
    with pytest.raises(InvalidParameter, match="sample"):
        list(cr.batches(model.descriptions["Unet"], {"sample": np.zeros((2, 4, 64, 64)), "timestep": np.zeros(2),
                                                      "encoder_hidden_states": np.zeros((2, 32, 1, 77))}))


def test_chunked_unets_chain_chunk_ones_outputs_into_chunk_two() -> None:
    # Written by hand after Apple's chunked Unet (the converter does not chunk).
    chunk2 = Description(
        (Port("encoder_hidden_states", (2, 32, 1, 77), "float32"), Port("timestep", (2,), "float32"),
         Port("input_skip_0", (2, 16, 32, 32), "float16"), Port("emb", (2, 64, 1, 1), "float32")),
        (Port("noise_pred", (2, 4, 32, 32), "float32"),),
    )
    feed = {"sample": np.zeros((2, 4, 32, 32), np.float32), "timestep": np.ones(2, np.float32),
            "encoder_hidden_states": np.zeros((2, 32, 1, 77), np.float32)}
    first = {"input_skip_0": np.ones((2, 16, 32, 32), np.float32), "emb": np.ones((2, 64, 1, 1), np.float32)}
    second = cr.chunk_inputs(chunk2, feed, first)
    assert list(second) == ["encoder_hidden_states", "timestep", "input_skip_0", "emb"]
    assert second["input_skip_0"].dtype == np.float16
    with pytest.raises(ModelInvalid, match="emb"):
        cr.chunk_inputs(chunk2, feed, {"input_skip_0": first["input_skip_0"]})


def test_palettized_weights_are_6_bit_lookup_tables(converted, tmp_path) -> None:
    from diffusiond.daemon.coreml.converter import convert

    def lookups(folder: Path) -> int:
        return mil_ops(next(folder.glob("*_text_encoder.mlpackage"))).count("constexpr_lut_to_dense")

    out = convert("tiny", tmp_path, palettize=True, progress=lambda _: None, parts=("TextEncoder",))
    assert lookups(converted[0]) == 0 and lookups(out) > 0
    assert json.loads((out / "diffusiond.json").read_text())["palettized"] is True


def mil_ops(package: Path) -> list[str]:
    spec = ct.utils.load_spec(str(package))
    return [op.type for f in spec.mlProgram.functions.values() for b in f.block_specializations.values() for op in b.operations]


def test_the_split_einsum_unet_has_one_softmax_per_head(converted) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    unet = UNet2DConditionModel.from_pretrained(TINY / "unet")
    attentions = sum(isinstance(module, Attention) for module in unet.modules())
    heads = tiny_config("unet")["attention_head_dim"]  # in SD's UNet config this counts the heads
    assert mil_ops(next(converted[0].glob("*_unet.mlpackage"))).count("softmax") == attentions * heads
    assert json.loads((converted[0] / "diffusiond.json").read_text())["attention"] == "split_einsum"


def test_split_einsum_attention_computes_what_diffusers_does() -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from diffusiond.daemon.coreml import split_einsum

    unet = UNet2DConditionModel.from_pretrained(TINY / "unet").eval()
    generator = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 32, 32, generator=generator), torch.tensor([981, 1]),
            torch.randn(2, 77, 32, generator=generator))
    with torch.no_grad():
        expected = unet(*args).sample
        split_einsum.apply(unet)
        got = unet(*args).sample
    assert torch.allclose(got, expected, atol=1e-5)


def test_compiled_models_are_described_by_their_metadata_and_preferred(tmp_path) -> None:
    # metadata.json as Core ML writes it into a compiled model (hand-written here: compiling needs a Mac).
    metadata = [{"inputSchema": [{"name": "input_ids", "shape": "[1, 77]", "dataType": "Float32", "type": "MultiArray"}],
                 "outputSchema": [{"name": "last_hidden_state", "shape": "[1, 77, 768]", "dataType": "Float16",
                                   "type": "MultiArray"}]}]
    described = description_from_metadata(metadata)
    assert described.input("input_ids") == Port("input_ids", (1, 77), "float32")
    assert described.output("last_hidden_state").dtype == "float16"
    for name in ("TextEncoder.mlmodelc", "Stable_Diffusion_version_x_text_encoder.mlpackage",
                 "UnetChunk1.mlmodelc", "UnetChunk2.mlmodelc", "Stable_Diffusion_version_x_vae_decoder.mlpackage"):
        (tmp_path / name).mkdir()
    assert {k: v.name for k, v in find_parts(tmp_path).items()} == {
        "TextEncoder": "TextEncoder.mlmodelc", "UnetChunk1": "UnetChunk1.mlmodelc", "UnetChunk2": "UnetChunk2.mlmodelc",
        "VAEDecoder": "Stable_Diffusion_version_x_vae_decoder.mlpackage"}


# sysctl's answers on each machine (hw.perflevel* is absent on Intel Macs).
MACHINES = {
    "M1, 8 GB": ({"machdep.cpu.brand_string": "Apple M1", "hw.perflevel0.physicalcpu": "4", "hw.perflevel1.physicalcpu": "4",
                  "hw.memsize": str(8 * 1024**3), "hw.optional.arm64": "1"}, "cpuAndNeuralEngine"),
    "M1 Pro": ({"machdep.cpu.brand_string": "Apple M1 Pro", "hw.perflevel0.physicalcpu": "8",
                "hw.perflevel1.physicalcpu": "2", "hw.memsize": str(16 * 1024**3), "hw.optional.arm64": "1"}, "cpuAndGPU"),
    "M1 Max": ({"machdep.cpu.brand_string": "Apple M1 Max", "hw.perflevel0.physicalcpu": "8",
                "hw.perflevel1.physicalcpu": "2", "hw.memsize": str(32 * 1024**3), "hw.optional.arm64": "1"}, "cpuAndGPU"),
    "M2": ({"machdep.cpu.brand_string": "Apple M2", "hw.perflevel0.physicalcpu": "4", "hw.perflevel1.physicalcpu": "4",
            "hw.memsize": str(16 * 1024**3), "hw.optional.arm64": "1"}, "cpuAndNeuralEngine"),
    "M2 Ultra": ({"machdep.cpu.brand_string": "Apple M2 Ultra", "hw.perflevel0.physicalcpu": "16",
                  "hw.perflevel1.physicalcpu": "8", "hw.memsize": str(64 * 1024**3), "hw.optional.arm64": "1"}, "cpuAndGPU"),
    "Intel": ({"machdep.cpu.brand_string": "Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz", "hw.physicalcpu": "8",
               "hw.memsize": str(16 * 1024**3)}, "cpuAndGPU"),
}


@pytest.mark.parametrize("name", MACHINES)
def test_auto_compute_units_follow_the_rule_without_a_measurement(name, tmp_path) -> None:
    values, expected = MACHINES[name]
    machine = parse_sysctl(values, "macOS 14.5")
    assert compute_units.choose("auto", tmp_path, machine, "sd15-coreml") == expected
    assert machine.has_neural_engine == (name != "Intel")


def test_the_stored_bench_winner_overrides_the_rule(tmp_path) -> None:
    m2, m1_pro = parse_sysctl(MACHINES["M2"][0], "macOS 14.5"), parse_sysctl(MACHINES["M1 Pro"][0], "macOS 14.5")
    compute_units.record(tmp_path, m2, "sd15-coreml", "cpuAndGPU", 9.5, "2026-11-26T09:00:00+00:00")
    compute_units.record(tmp_path, m1_pro, "sd15-coreml", "all", 6.1, "2026-11-26T09:00:00+00:00")
    assert compute_units.choose("auto", tmp_path, m2, "sd15-coreml") == "cpuAndGPU"  # the rule says the Neural Engine
    assert compute_units.choose("auto", tmp_path, m1_pro, "sd15-coreml") == "all"
    assert compute_units.choose("auto", tmp_path, m2, "sd21-base-coreml") == "cpuAndNeuralEngine"  # not measured
    assert compute_units.choose("cpuOnly", tmp_path, m2, "sd15-coreml") == "cpuOnly"  # asked for: no override


def test_the_bench_times_each_option_and_prints_a_pasteable_table(tiny, runtime) -> None:
    from diffusiond.daemon.coreml.compute_bench import measure, table
    from diffusiond.daemon.engine.pipeline import Pipeline

    opened: list[str] = []

    def open_pipeline(units: str) -> Pipeline:
        opened.append(units)
        return Pipeline(tiny, runtime)

    request = Request("x", steps=1, guidance_scale=1, width=64, height=64, seed=1)
    timings = measure(open_pipeline, ["cpuAndGPU", "cpuOnly"], request, 1, progress=lambda _: None)
    assert opened == ["cpuAndGPU", "cpuOnly"] and timings[0].seconds_per_image <= timings[1].seconds_per_image
    machine = parse_sysctl(MACHINES["M1 Pro"][0], "macOS 14.5")
    header, rule, *rows = table(machine, "sd15-coreml", timings).splitlines()
    assert header.split("|")[1:-1] == [f" {c} " for c in
                                       ("Chip", "Cores (P+E)", "Memory", "OS", "Model", "Compute units", "Steps",
                                        "s/image", "it/s", "Load (s)")]
    assert rows[0].startswith("| Apple M1 Pro | 8+2 | 16 GB | macOS 14.5 | sd15-coreml | ")
    assert len(rows) == 2


@pytest.mark.skipif(sys.platform == "darwin", reason="off a Mac the runtime refuses; on one it loads")
def test_off_a_mac_a_core_ml_model_is_refused_saying_why(converted, tmp_path) -> None:
    from diffusiond.daemon.config import Config
    from diffusiond.daemon.engine.runtimes import open_runtime

    with pytest.raises(ModelInvalid, match="macOS only"):
        open_runtime(ModelFolder.open(str(converted[0])), Config(device="cpu", state_dir=tmp_path), False)
    with pytest.raises(ModelInvalid, match="diffusiond convert"):
        open_runtime(ModelFolder.open("tiny"), Config(runtime="coreml", device="cpu", state_dir=tmp_path), False)


# On a Mac (macos.yml): the converted tiny model against the torch runtime, and a bench run.
# Core ML computes in float16 where torch computes in float32 here; the tiny model's images differ by
# at most TOLERANCE per pixel channel (of 255) and on average by a tenth of it.
TOLERANCE = 8


@needs_a_mac
@pytest.mark.parametrize("attention", ["split_einsum", "original"])
@pytest.mark.parametrize("units", ["cpuOnly", "cpuAndGPU", "cpuAndNeuralEngine"])
def test_the_converted_tiny_model_draws_the_torch_runtimes_image(attention, units, tiny, runtime, tmp_path_factory) -> None:
    from diffusiond.daemon.coreml.converter import convert
    from diffusiond.daemon.engine.pipeline import Pipeline
    from diffusiond.daemon.engine.runtimes.coreml_runtime import CoreMLRuntime

    out = tmp_path_factory.getbasetemp() / f"tiny-{attention}"
    if not out.exists():
        convert("tiny", out, attention, progress=lambda _: None)
    model = ModelFolder.open(str(out))
    request = Request("a lighthouse at dusk", steps=8, seed=7, count=2)
    ours = Pipeline(model, CoreMLRuntime(model, units)).generate(request).images
    theirs = Pipeline(tiny, runtime).generate(request).images
    for a, b in zip(ours, theirs):
        difference = np.abs(a.astype(int) - b.astype(int))
        assert difference.max() <= TOLERANCE and difference.mean() <= TOLERANCE / 10, (difference.max(), difference.mean())


@needs_a_mac
def test_a_bench_run_completes_and_auto_uses_its_winner(converted, tmp_path, capsys) -> None:
    from diffusiond.daemon.cli import main
    from diffusiond.daemon.coreml.hardware import this_machine

    config = tmp_path / "config.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    assert main(["bench", "-m", str(converted[0]), "--compute-units", "cpuOnly", "cpuAndGPU",
                 "--steps", "2", "--runs", "1", "--config", str(config)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 2 and all(str(converted[0]) in row for row in rows)
    fastest = rows[0].split("|")[6].strip()
    assert compute_units.choose("auto", tmp_path / "state", this_machine(), str(converted[0])) == fastest


def test_hub_repos_convert_and_core_ml_repos_open(converted, tmp_path) -> None:
    """A diffusers repo on the Hub converts; a Core ML repo pulled like Apple's (original/packages/,
    the tokenizer at the top, no diffusiond.json) opens with facts from the specs and SD's defaults."""
    import os
    import shutil
    import subprocess

    from .fake_hub import FakeHub

    repo = tmp_path / "repo"
    packages = repo / "original" / "packages"
    shutil.copytree(converted[0], packages, ignore=shutil.ignore_patterns("diffusiond.json", "vocab.json", "merges.txt"))
    for file in ("vocab.json", "merges.txt"):
        shutil.copyfile(converted[0] / file, repo / file)
    script = (
        "from diffusiond.daemon.models import store\n"
        "from diffusiond.daemon.models.diffusers_folder import ModelFolder\n"
        "store.pull('someone/coreml-tiny', False, lambda progress: None, compute_units='cpuAndGPU')\n"
        "m = ModelFolder.open('someone/coreml-tiny')\n"
        "print(type(m).__name__, *m.default_shape, m.latent_channels, m.scaling_factor, sorted(m.parts), m.tokenizer_dirs[0].name)\n"
        "from diffusiond.daemon.coreml.converter import convert\n"
        f"convert('someone/tiny', __import__('pathlib').Path({str(tmp_path / 'out')!r}), parts=('TextEncoder',))\n"
    )
    with FakeHub({"someone/coreml-tiny": repo, "someone/tiny": TINY}) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    opened = done.stdout.splitlines()[0].split()
    assert opened[:6] == ["CoreMLFolder", "256", "256", "4", "0.18215", "['TextEncoder',"]
    assert opened[-2] == "'VAEEncoder']" and opened[-1] != "packages"  # vocab.json from the repo's top
    assert "downloaded someone/tiny (0.00 of 0.00 GB)" in done.stdout
    assert spec_ports(next((tmp_path / "out").glob("*_text_encoder.mlpackage"))).input("input_ids").shape == (1, 77)


def test_the_safety_checker_converts_with_the_contract_and_flags_as_diffusers_does(tiny_with_safety_checker, tmp_path) -> None:
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from diffusiond.daemon.coreml.converter import _SafetyChecker, convert

    out = convert(str(tiny_with_safety_checker), tmp_path, progress=lambda _: None, parts=("SafetyChecker",))
    ports = spec_ports(next(out.glob("*_safety_checker.mlpackage")))
    assert [(p.name, p.shape) for p in ports.inputs] == [
        ("clip_input", (1, 3, 32, 32)), ("images", (1, 256, 256, 3)), ("adjustment", (1,))]
    assert [(p.name, p.shape) for p in ports.outputs] == [("filtered_images", (1, 256, 256, 3)), ("has_nsfw_concepts", (1,))]
    [(feed, real)] = cr.safety_inputs(ports, np.zeros((1, 3, 32, 32)), np.zeros((1, 256, 256, 3)))
    assert real == 1
    assert {k: (v.shape, v.dtype.name) for k, v in feed.items()} == {p.name: (p.shape, p.dtype) for p in ports.inputs}
    assert CoreMLFolder(out, "x").feature_extractor_dir == out  # its 32-pixel preprocessing, not CLIP's 224

    checker = StableDiffusionSafetyChecker.from_pretrained(tiny_with_safety_checker / "safety_checker").eval()
    with torch.no_grad():
        clip_input, images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.rand(8, 4, 4, 3)
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        cosines = _SafetyChecker._cosine(embeds, checker.concept_embeds)[:, 0]
        checker.concept_embeds_weights.fill_(2.0)  # out of a cosine's reach: never flags ...
        checker.concept_embeds_weights[0] = cosines.median()  # ... but the first concept flags about half
        _, expected = checker.forward_onnx(clip_input, images.clone())
        filtered, flagged = _SafetyChecker(checker)(clip_input, images, torch.zeros(8))
    assert flagged.bool().tolist() == expected.tolist() and 0 < sum(expected.tolist()) < 8
    assert torch.equal(filtered[flagged.bool()], torch.zeros_like(filtered[flagged.bool()]))


@needs_a_mac
def test_a_converted_safety_checker_blacks_out_a_flagged_image(tiny_with_safety_checker, tmp_path) -> None:
    from diffusiond.daemon.coreml.converter import convert
    from diffusiond.daemon.engine.pipeline import Pipeline
    from diffusiond.daemon.engine.runtimes.coreml_runtime import CoreMLRuntime

    model = ModelFolder.open(str(convert(str(tiny_with_safety_checker), tmp_path, "original", progress=lambda _: None)))
    result = Pipeline(model, CoreMLRuntime(model, "cpuOnly", with_safety_checker=True)).generate(Request("x", steps=2, seed=1))
    assert result.flagged == [True] and not result.images[0].any()  # the fixture's checker flags every image


# SDXL: a tiny random base and refiner in diffusers' format, converted once each.

XL_SIZE = (32, 32)  # 32 px images: 16×16 latents with the tiny VAE's factor of 2


@pytest.fixture(scope="module")
def converted_xl(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """The tiny SDXL base converted once (the default split_einsum attention) at 32 px, its diffusers
    source, and the progress lines."""
    from diffusiond.daemon.coreml.converter import convert

    source = build_tiny_sdxl.build(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")
    lines: list[str] = []
    out = convert(str(source), tmp_path_factory.mktemp("coreml") / "tiny-sdxl", size=XL_SIZE, progress=lines.append)
    return out, source, lines


def test_the_converted_sdxl_matches_apples_contract_port_by_port(converted_xl) -> None:
    """Apple's contract, from apple/ml-stable-diffusion torch2coreml.py at e12202c (--xl-version):
    convert_text_encoder (float32 input_ids (1, 77); outputs hidden_embeds = hidden_states[-2] and
    pooled_outputs), convert_unet (inputs sample, timestep, encoder_hidden_states (B, C, 1, 77), time_ids
    (B, 6), text_embeds (B, pooled) in that order, cast to float16; output noise_pred), convert_vae_decoder
    and convert_vae_encoder (float32 z and x for SDXL's VAE); every output float32 (_convert_to_coreml).
    Package names from _get_out_path: Stable_Diffusion_version_<model>_<text_encoder_2 …>.mlpackage."""
    out, source, lines = converted_xl
    name = source.name
    packages = sorted(p.name for p in out.glob("*.mlpackage"))
    assert packages == sorted(f"Stable_Diffusion_version_{name}_{suffix}.mlpackage"
                              for suffix in ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"))
    assert [line.split(":")[0] for line in lines if " in " in line] == [
        f"[{i}/5] {part}" for i, part in enumerate(("TextEncoder", "TextEncoder2", "Unet", "VAEDecoder", "VAEEncoder"), 1)]
    f16, f32 = "float16", "float32"
    expected = {
        "text_encoder": ([("input_ids", (1, 77), f32)],
                         [("hidden_embeds", (1, 77, 32), f32), ("pooled_outputs", (1, 32), f32)]),
        "text_encoder_2": ([("input_ids", (1, 77), f32)],
                           [("hidden_embeds", (1, 77, 32), f32), ("pooled_outputs", (1, 32), f32)]),
        "unet": ([("sample", (2, 4, 16, 16), f16), ("timestep", (2,), f16), ("encoder_hidden_states", (2, 64, 1, 77), f16),
                  ("time_ids", (2, 6), f16), ("text_embeds", (2, 32), f16)],
                 [("noise_pred", (2, 4, 16, 16), f32)]),
        "vae_decoder": ([("z", (1, 4, 16, 16), f32)], [("image", (1, 3, 32, 32), f32)]),
        "vae_encoder": ([("x", (1, 3, 32, 32), f32)], [("latent", (1, 8, 16, 16), f32)]),
    }
    for suffix, (inputs, outputs) in expected.items():
        ports = spec_ports(out / f"Stable_Diffusion_version_{name}_{suffix}.mlpackage")
        assert [(p.name, p.shape, p.dtype) for p in ports.inputs] == inputs, suffix
        assert [(p.name, p.shape, p.dtype) for p in ports.outputs] == outputs, suffix


def test_the_sdxl_vae_computes_in_float32_and_the_rest_in_float16(converted_xl) -> None:
    """torch2coreml.py converts SDXL's VAE with ct.precision.FLOAT32 (its float16 overflows), the rest
    in float16: no float16 tensor anywhere in the VAE programs, float16 throughout the Unet's."""
    out, _, _ = converted_xl

    def program(suffix: str) -> str:
        return str(ct.utils.load_spec(str(next(out.glob(f"*_{suffix}.mlpackage")))).mlProgram)

    assert "FLOAT16" not in program("vae_decoder") and "FLOAT16" not in program("vae_encoder")
    assert "FLOAT16" in program("unet") and "FLOAT16" in program("text_encoder_2")


def test_a_converted_sdxl_opens_with_its_family_and_facts(converted_xl) -> None:
    out, source, _ = converted_xl
    model = ModelFolder.open(str(out))
    assert isinstance(model, CoreMLFolder)
    assert (model.family, model.text_encoders) == ("sdxl", ("TextEncoder", "TextEncoder2"))
    assert model.force_zeros_for_empty_prompt and not model.requires_aesthetics_score
    assert model.default_shape == XL_SIZE and model.latent_channels == 4
    vae = json.loads((source / "vae" / "config.json").read_text())
    scheduler = json.loads((source / "scheduler" / "scheduler_config.json").read_text())
    assert model.scaling_factor == vae["scaling_factor"] and model.scheduler_config == scheduler
    assert len(model.tokenizer_dirs) == 2 and (model.tokenizer_dirs[0] / "vocab.json").read_bytes() == (
        source / "tokenizer" / "vocab.json").read_bytes()
    from diffusiond.daemon.engine.tokenizer import Tokenizer

    # SDXL's second tokenizer pads with "!" (as Swift's TextEncoder2: padToken "!"), the first with its end token
    first, second = (Tokenizer(folder).encode("a lighthouse").ids for folder in model.tokenizer_dirs)
    bang = json.loads((source / "tokenizer" / "vocab.json").read_text())["!"]
    assert second[-1] == bang and first[-1] != bang and (first[:4] == second[:4]).all()


class SpecStandIn:
    """NOT Core ML: a stand-in for one loaded package at the macOS boundary (`coreml_runtime._load`), as
    tests/fixtures/coreml_stand_in is for compiled models. It checks each feed against the package's
    declared inputs (names, shapes, dtypes, read by coremltools) and answers each declared output
    filled with `value`, so a test can tell whose output went where."""

    def __init__(self, path: Path, value: float) -> None:
        self.ports, self.value, self.feeds = spec_ports(path), value, []

    def predict(self, feed: dict) -> dict:
        assert {k: (v.shape, v.dtype.name) for k, v in feed.items()} == {p.name: (p.shape, p.dtype) for p in self.ports.inputs}
        self.feeds.append(feed)
        return {p.name: np.full(p.shape, self.value, np.float32) for p in self.ports.outputs}


def test_the_sdxl_runtime_feeds_each_part_what_its_spec_declares(converted_xl, monkeypatch) -> None:
    """encode_text: both encoders' hidden_embeds side by side (TextEncoder's first), pooled_outputs of
    the second (StableDiffusionXLPipeline.swift encodePrompt); predict_noise: text_embeds and time_ids
    cut into the Unet's batch of two, in its float16."""
    out, _, _ = converted_xl
    model = ModelFolder.open(str(out))
    values = {"TextEncoder": 1.0, "TextEncoder2": 2.0, "Unet": 3.0, "VAEDecoder": 4.0, "VAEEncoder": 5.0}
    loaded: dict[str, SpecStandIn] = {}

    def load(path: Path, units: str, name: str) -> SpecStandIn:
        part = next(p for p, where in model.parts.items() if where == path)
        loaded[part] = SpecStandIn(path, values[part])
        return loaded[part]

    monkeypatch.setattr(cr, "_load", load)
    runtime = cr.CoreMLRuntime(model, "cpuAndGPU")
    ids = np.arange(3 * 77, dtype=np.int64).reshape(3, 77) % 2000
    encoding = runtime.encode_text([ids, ids + 1])
    assert encoding.hidden.shape == (3, 77, 64) and encoding.pooled.shape == (3, 32)
    assert (encoding.hidden[..., :32] == 1).all() and (encoding.hidden[..., 32:] == 2).all() and (encoding.pooled == 2).all()
    assert [f["input_ids"][0, 0] for f in loaded["TextEncoder2"].feeds] == [1, 78, 155]
    rows = 3  # a short last Unet batch: padded, the padding dropped
    conditioning = Conditioning(encoding.hidden, encoding.pooled,
                                np.tile(np.array([32, 32, 0, 0, 32, 32], np.float32), (rows, 1)))
    noise = runtime.predict_noise(np.zeros((rows, 4, 16, 16), np.float32), np.float32(999), conditioning)
    assert noise.shape == (rows, 4, 16, 16) and (noise == 3).all()
    first = loaded["Unet"].feeds[0]
    assert first["time_ids"].dtype == np.float16 and first["time_ids"][1].tolist() == [32, 32, 0, 0, 32, 32]
    assert np.array_equal(first["encoder_hidden_states"][0, :, 0, :], encoding.hidden[0].T.astype(np.float16))
    with pytest.raises(InvalidParameter, match="text_embeds"):
        runtime.predict_noise(np.zeros((2, 4, 16, 16), np.float32), np.float32(1), Conditioning(encoding.hidden[:2]))
    with pytest.raises(ModelInvalid, match="2 text encoders"):
        runtime.encode_text([ids])


def test_apples_flat_time_ids_take_two_rows_of_six() -> None:
    """Apple's first SDXL Unets declare time_ids (12,), the later ones (2, 6): StableDiffusionXLPipeline.swift
    (baseGeometry) builds either from the Unet's declared shape. Written by hand after that."""
    unet = Description(
        (Port("sample", (2, 4, 128, 128), "float16"), Port("timestep", (2,), "float16"),
         Port("encoder_hidden_states", (2, 2048, 1, 77), "float16"), Port("time_ids", (12,), "float16"),
         Port("text_embeds", (2, 1280), "float16")),
        (Port("noise_pred", (), "float32"),),
    )
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [1024, 1024, 0, 0, 1024, 1024]], np.float32)
    conditioning = Conditioning(np.zeros((2, 77, 2048), np.float32), np.zeros((2, 1280), np.float32), time_ids)
    [(feed, real)] = cr.unet_inputs(unet, np.zeros((2, 4, 128, 128), np.float32), np.float32(1), conditioning)
    assert real == 2 and feed["time_ids"].shape == (12,) and feed["time_ids"].tolist() == time_ids.ravel().tolist()
    from diffusiond.daemon.models.coreml_folder import time_ids_width

    assert time_ids_width(unet) == 6


def test_a_converted_sdxl_refiner_has_one_text_encoder_and_five_time_ids(tmp_path) -> None:
    """A refiner alone converts as torch2coreml.py --model-version <refiner> --xl-version does: no
    TextEncoder (the pipeline has none), TextEncoder2, a Unet whose time_ids are (2, 5) (original size,
    crop, aesthetic score: requires_aesthetics_score) and whose hidden states are the second encoder's."""
    from diffusiond.daemon.coreml.converter import convert

    source = build_tiny_sdxl.build(tmp_path / "tiny-refiner", refiner=True)
    out = convert(str(source), tmp_path / "out", "original", XL_SIZE, progress=lambda _: None,
                  parts=("TextEncoder", "TextEncoder2", "Unet", "VAEDecoder"))
    assert not list(out.glob("*_text_encoder.mlpackage"))
    unet = spec_ports(next(out.glob("*_unet.mlpackage")))
    assert [(p.name, p.shape) for p in unet.inputs][2:] == [
        ("encoder_hidden_states", (2, 32, 1, 77)), ("time_ids", (2, 5)), ("text_embeds", (2, 32))]
    model = ModelFolder.open(str(out))
    assert (model.family, model.text_encoders) == ("sdxl-refiner", ("TextEncoder2",))
    assert model.tokenizer_dirs == (out / "tokenizer_2",)
    assert model.requires_aesthetics_score and not model.force_zeros_for_empty_prompt


def test_palettizing_sdxl_makes_both_text_encoders_lookup_tables(tmp_path) -> None:
    """torch2coreml.py quantize_weights palettizes text_encoder, text_encoder_2, unet and refiner."""
    from diffusiond.daemon.coreml.converter import convert

    source = build_tiny_sdxl.build(tmp_path / "tiny-sdxl")
    out = convert(str(source), tmp_path / "out", size=XL_SIZE, palettize=True, progress=lambda _: None,
                  parts=("TextEncoder2",))
    assert mil_ops(next(out.glob("*_text_encoder_2.mlpackage"))).count("constexpr_lut_to_dense") > 0


def test_a_refiner_converts_beside_its_base_as_apples_base_with_refiner(converted_xl, tmp_path) -> None:
    """torch2coreml.py --refiner-version: the refiner's Unet beside the base's as
    Stable_Diffusion_version_<base>_refiner.mlpackage (UnetRefiner.mlmodelc in Resources/), time_ids
    (2, 5), run with the base's TextEncoder2 and VAE (StableDiffusionXL+Resources.swift)."""
    from diffusiond.daemon.coreml.converter import convert
    from diffusiond.daemon.errors import ConversionFailed

    out, source, _ = converted_xl
    folder = tmp_path / "with-refiner"
    shutil.copytree(out, folder)
    refiner = build_tiny_sdxl.build(tmp_path / "tiny-refiner", refiner=True)
    convert(str(source), folder, size=XL_SIZE, parts=("UnetRefiner",), refiner=str(refiner), progress=lambda _: None)
    package = folder / f"Stable_Diffusion_version_{source.name}_refiner.mlpackage"
    assert [(p.name, p.shape, p.dtype) for p in spec_ports(package).inputs][2:] == [
        ("encoder_hidden_states", (2, 32, 1, 77), "float16"), ("time_ids", (2, 5), "float16"), ("text_embeds", (2, 32), "float16")]
    model = ModelFolder.open(str(folder))
    assert (model.family, model.has_refiner, "UnetRefiner" in model.parts) == ("sdxl", True, False)
    beside = model.refiner_model
    assert (beside.family, beside.parts["Unet"], beside.parts["TextEncoder2"]) == (
        "sdxl-refiner", package, model.parts["TextEncoder2"])
    assert beside.requires_aesthetics_score and not beside.force_zeros_for_empty_prompt and model.force_zeros_for_empty_prompt
    assert beside.scheduler_config == json.loads((refiner / "scheduler" / "scheduler_config.json").read_text())
    with pytest.raises(ConversionFailed, match="is not an SDXL refiner"):
        convert(str(source), tmp_path / "x", size=XL_SIZE, parts=("UnetRefiner",), refiner=str(source), progress=lambda _: None)


def test_sdxl_resources_have_apples_names_for_the_swift_pipeline(converted_xl, tmp_path, monkeypatch) -> None:
    """bundle_resources_for_swift_cli's names (text_encoder_2 → TextEncoder2.mlmodelc, …), compiled by
    tests/test_converter.py's stand-in xcrun (Xcode's compiler runs on macOS only); the second tokenizer
    goes along for diffusiond (Swift ignores it)."""
    from diffusiond.daemon.coreml.converter import swift_resources

    from .test_converter import STAND_IN_XCRUN, put_xcrun_on_path

    put_xcrun_on_path(STAND_IN_XCRUN.format(python=sys.executable, log=str(tmp_path / "xcrun.log")), tmp_path / "bin",
                      monkeypatch)
    out, source, _ = converted_xl
    folder = shutil.copytree(out, tmp_path / "tiny-sdxl")
    resources = swift_resources(folder, source.name, lambda _: None)
    assert sorted(p.name for p in resources.iterdir()) == [
        "TextEncoder.mlmodelc", "TextEncoder2.mlmodelc", "Unet.mlmodelc", "VAEDecoder.mlmodelc", "VAEEncoder.mlmodelc",
        "diffusiond.json", "merges.txt", "tokenizer_2", "vocab.json"]
    assert (resources / "TextEncoder2.mlmodelc" / "source").read_text().endswith("_text_encoder_2.mlpackage")


@needs_a_mac
@pytest.mark.parametrize("units", ["cpuOnly", "cpuAndGPU"])
def test_the_converted_sdxl_computes_what_diffusers_does(converted_xl, units) -> None:
    """On a Mac (macos.yml): Core ML running the converted tiny SDXL against diffusers' own modules —
    the text encoding (StableDiffusionXLPipeline.encode_prompt: both penultimate hidden states, the
    pooled projection), one guided Unet call with text_embeds and time_ids, and the float32 VAE decoder.
    Core ML computes the text encoders and the Unet in float16: the tolerances are a first setting, for
    the macOS job to confirm (not run where this was written)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from diffusiond.daemon.engine.tokenizer import Tokenizer

    out, source, _ = converted_xl
    model = ModelFolder.open(str(out))
    runtime = cr.CoreMLRuntime(model, units)
    prompt = "a lighthouse at dusk, oil painting"
    encoding = runtime.encode_text([Tokenizer(folder).encode(prompt).ids[None] for folder in model.tokenizer_dirs])
    pipe = StableDiffusionXLPipeline.from_pretrained(str(source))
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    assert encoding.pooled is not None
    assert np.abs(encoding.hidden - embeds.numpy()).max() <= 2e-2 and np.abs(encoding.pooled - pooled.numpy()).max() <= 2e-2
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
    hidden, text = np.concatenate([encoding.hidden] * 2), np.concatenate([encoding.pooled] * 2)
    time_ids = np.tile(np.array([32, 32, 0, 0, 32, 32], np.float32), (2, 1))
    noise = runtime.predict_noise(sample, np.float32(500), Conditioning(hidden, text, time_ids))
    with torch.no_grad():
        expected = pipe.unet(torch.from_numpy(sample), torch.tensor([500.0, 500.0]), encoder_hidden_states=torch.from_numpy(hidden),
                             added_cond_kwargs={"text_embeds": torch.from_numpy(text), "time_ids": torch.from_numpy(time_ids)}).sample
        image = pipe.vae.decode(torch.from_numpy(sample[:1])).sample
    assert np.abs(noise - expected.numpy()).max() <= 5e-2
    assert np.abs(runtime.decode(sample[:1]) - image.numpy()).max() <= 1e-3


def test_the_sdxl_networks_converted_compute_what_diffusers_pipeline_does(tmp_path) -> None:
    """In torch, before coremltools: the converter's wrappers, fed as the runtime feeds them, give
    StableDiffusionXLPipeline.encode_prompt's prompt embeddings (both hidden_embeds side by side) and
    pooled embeddings (TextEncoder2's pooled_outputs), and its UNet's output for added_cond_kwargs."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from diffusiond.daemon.coreml.converter import _TextEncoderXL, _UnetXL
    from diffusiond.daemon.engine.tokenizer import Tokenizer

    source = build_tiny_sdxl.build(tmp_path / "tiny-sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(source))
    prompt = "a lighthouse at dusk, oil painting"
    ids = [torch.from_numpy(Tokenizer(source / folder).encode(prompt).ids[None]).float() for folder in ("tokenizer", "tokenizer_2")]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        (hidden_1, _), (hidden_2, ours_pooled) = _TextEncoderXL(pipe.text_encoder)(ids[0]), _TextEncoderXL(pipe.text_encoder_2)(ids[1])
        hidden = torch.cat([hidden_1, hidden_2], dim=2)
        assert torch.allclose(hidden, embeds, atol=1e-6) and torch.allclose(ours_pooled, pooled, atol=1e-6)
        sample, time_ids = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([[32.0, 32, 0, 0, 32, 32]])
        expected = pipe.unet(sample, torch.tensor([500.0]), encoder_hidden_states=hidden,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = _UnetXL(pipe.unet)(sample, torch.tensor([500.0]), hidden.transpose(1, 2)[:, :, None, :], time_ids, pooled)
    assert torch.allclose(got, expected, atol=1e-6)
