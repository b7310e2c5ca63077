"""`diffusiond convert` against Apple's converter (apple/ml-stable-diffusion,
python_coreml_stable_diffusion/torch2coreml.py, commit e12202c): what --palettize palettizes, the
Resources/ folder of --bundle-resources-for-swift-cli, the default attention. The specs are read
with coremltools' own reader on the real converted tiny model."""

from __future__ import annotations

import inspect
import json
import os
import platform
import stat
import sys
from pathlib import Path

import pytest

from diffusiond.daemon.models.catalog import TINY

import coremltools as ct  # noqa: E402  (the dev extra installs it)

ON_APPLE_SILICON = sys.platform == "darwin" and platform.machine() == "arm64"
needs_a_mac = pytest.mark.skipif(not ON_APPLE_SILICON, reason="xcrun coremlcompiler is on macOS only")
WEIGHT_THRESHOLD = 2048  # coremltools' OpPalettizerConfig default: constants of at most this many elements stay


@pytest.fixture(scope="module")
def palettized(tmp_path_factory) -> tuple[Path, list[str]]:
    """The tiny model converted once with --palettize (original attention: the quicker Unet to
    trace), and the progress lines."""
    from diffusiond.daemon.coreml.converter import convert

    lines: list[str] = []
    out = convert("tiny", tmp_path_factory.mktemp("palettized") / "tiny", "original", palettize=True,
                  progress=lines.append)
    return out, lines


def operations(package: Path) -> list:
    spec = ct.utils.load_spec(str(package))
    return [op for f in spec.mlProgram.functions.values() for b in f.block_specializations.values() for op in b.operations]


def elements(op) -> int:
    count = 1
    for dimension in op.outputs[0].type.tensorType.dimensions:
        count *= dimension.constant.size
    return count


def package(out: Path, suffix: str) -> Path:
    return next(out.glob(f"*_{suffix}.mlpackage"))


def test_palettize_leaves_the_vae_as_apples_converter_does(palettized) -> None:
    out, _ = palettized
    for suffix in ("vae_decoder", "vae_encoder"):
        ops = operations(package(out, suffix))
        assert not [op for op in ops if op.type == "constexpr_lut_to_dense"], suffix
        assert any(op.type == "const" and elements(op) > WEIGHT_THRESHOLD for op in ops), suffix


def test_palettize_leaves_the_embedding_tables_gather_alone(palettized) -> None:
    ops = operations(package(palettized[0], "text_encoder"))
    producer = {output.name: op for op in ops for output in op.outputs}
    [gather] = [op for op in ops if op.type == "gather"]
    table = producer[gather.inputs["x"].arguments[0].name]
    assert table.type == "const" and elements(table) > WEIGHT_THRESHOLD  # the token table, well over the threshold


@pytest.mark.parametrize("suffix", ["text_encoder", "unet"])
def test_palettize_turns_every_other_text_encoder_and_unet_weight_into_a_6_bit_table(palettized, suffix) -> None:
    ops = operations(package(palettized[0], suffix))
    gathered = {op.inputs["x"].arguments[0].name for op in ops if op.type == "gather"}
    tables = [op for op in ops if op.type == "constexpr_lut_to_dense"]
    assert tables
    assert all(op.attributes["lut"].type.tensorType.dimensions[0].constant.size == 2**6 for op in tables)
    left = [op.outputs[0].name for op in ops
            if op.type == "const" and elements(op) > WEIGHT_THRESHOLD and op.outputs[0].name not in gathered]
    assert left == []


STAND_IN_XCRUN = """#!{python}
'''A stand-in for macOS's `xcrun coremlcompiler compile PACKAGE DIR` (Xcode's, absent off macOS):
it makes DIR/<PACKAGE's stem>.mlmodelc as the real one does, naming its source inside, and logs the call.'''
import json, pathlib, sys
with open({log!r}, "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
tool, verb, package, folder = sys.argv[1:]
assert (tool, verb) == ("coremlcompiler", "compile")
compiled = pathlib.Path(folder) / (pathlib.Path(package).stem + ".mlmodelc")
compiled.mkdir()
(compiled / "source").write_text(package)
"""


def put_xcrun_on_path(script: str, folder: Path, monkeypatch) -> None:
    folder.mkdir()
    xcrun = folder / "xcrun"
    xcrun.write_text(script)
    xcrun.chmod(xcrun.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture
def stand_in_xcrun(tmp_path, monkeypatch) -> Path:
    """`xcrun` first on PATH: STAND_IN_XCRUN, at the OS boundary this machine lacks (Xcode's
    coremlcompiler runs on macOS only); the log of its calls is returned."""
    log = tmp_path / "xcrun.log"
    put_xcrun_on_path(STAND_IN_XCRUN.format(python=sys.executable, log=str(log)), tmp_path / "bin", monkeypatch)
    return log


SWIFT_NAMES = {"TextEncoder": "text_encoder", "Unet": "unet", "VAEDecoder": "vae_decoder", "VAEEncoder": "vae_encoder"}


def test_resources_are_laid_out_as_apples_bundle_for_the_swift_cli(palettized, stand_in_xcrun, tmp_path) -> None:
    import shutil

    from diffusiond.daemon.coreml.converter import swift_resources

    out = shutil.copytree(palettized[0], tmp_path / "tiny")
    lines: list[str] = []
    resources = swift_resources(out, "tiny", lines.append)
    assert resources == out / "Resources"
    assert sorted(p.name for p in resources.iterdir()) == [
        "TextEncoder.mlmodelc", "Unet.mlmodelc", "VAEDecoder.mlmodelc", "VAEEncoder.mlmodelc",
        "diffusiond.json", "merges.txt", "vocab.json"]
    calls = [json.loads(line) for line in stand_in_xcrun.read_text().splitlines()]
    assert sorted(calls) == sorted(["coremlcompiler", "compile", str(package(out, suffix)), str(resources)]
                                   for suffix in SWIFT_NAMES.values())
    for part, suffix in SWIFT_NAMES.items():
        assert (resources / f"{part}.mlmodelc" / "source").read_text() == str(package(out, suffix))
    for file in ("vocab.json", "merges.txt"):
        assert (resources / file).read_bytes() == (TINY / "tokenizer" / file).read_bytes()
    assert len(lines) == 4 and lines[0].startswith("Resources/: compiling")


def test_a_mac_without_xcodes_tools_is_told_the_packages_are_whole_and_what_to_install(palettized, tmp_path,
                                                                                       monkeypatch) -> None:
    """A stand-in for macOS's /usr/bin/xcrun without Xcode's command-line tools (its message, exit 1)."""
    import shutil

    from diffusiond.daemon.coreml.converter import swift_resources
    from diffusiond.daemon.errors import ConversionFailed

    message = "xcrun: error: invalid active developer path (/Library/Developer/CommandLineTools)"
    put_xcrun_on_path(f"#!/bin/sh\necho '{message}' >&2\nexit 1\n", tmp_path / "bin", monkeypatch)
    out = shutil.copytree(palettized[0], tmp_path / "tiny")
    with pytest.raises(ConversionFailed) as info:
        swift_resources(out, "tiny", lambda _: None)
    assert message in str(info.value) and "xcode-select --install" in str(info.value)
    assert "packages in" in str(info.value) and info.value.code == "conversion_failed"


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS has xcrun: there convert compiles Resources/")
def test_without_xcrun_convert_skips_resources_saying_why(palettized) -> None:
    out, lines = palettized
    assert not (out / "Resources").exists()
    assert "Resources/ for Apple's Swift CLI and Diffusers for Mac: skipped" in lines[-1]
    assert "xcrun coremlcompiler" in lines[-1]


@pytest.mark.parametrize(("size", "in_resources"), [((512, 512), True), ((256, 256), False)])
def test_swift_gets_a_safety_checker_only_for_512x512(tiny_with_safety_checker, stand_in_xcrun, tmp_path, size,
                                                      in_resources) -> None:
    """Swift's SafetyChecker.isSafe feeds `images` of 1×512×512×3 whatever the model's size."""
    from diffusiond.daemon.coreml.converter import convert

    lines: list[str] = []
    out = convert(str(tiny_with_safety_checker), tmp_path, size=size, progress=lines.append, parts=("SafetyChecker",))
    assert (out / "Resources" / "SafetyChecker.mlmodelc").is_dir() == in_resources
    assert (out / "Resources" / "preprocessor_config.json").is_file()
    refusals = [line for line in lines if "no SafetyChecker.mlmodelc" in line]
    assert refusals == ([] if in_resources else [
        "Resources/: no SafetyChecker.mlmodelc: the safety checker takes 256x256 images and Apple's Swift pipeline "
        "(Diffusers for Mac too) feeds it 512x512 ones; there it would fail every image, so Swift runs without it "
        "(diffusiond uses it); convert at --resolution 512 for a checked Swift folder"])


@needs_a_mac
def test_on_a_mac_resources_holds_compiled_models_that_declare_the_packages_inputs(palettized) -> None:
    """Inputs only: compiled models may declare outputs with an empty shape (Apple's published ones do)."""
    from diffusiond.daemon.models.coreml_folder import CoreMLFolder, describe

    out, _ = palettized
    resources = out / "Resources"
    for part, suffix in SWIFT_NAMES.items():
        assert describe(resources / f"{part}.mlmodelc").inputs == describe(package(out, suffix)).inputs
    folder = CoreMLFolder.open(resources, "tiny")
    assert set(folder.parts) == set(SWIFT_NAMES) and folder.tokenizer_dirs == (resources,)


def test_convert_and_the_cli_default_to_split_einsum_attention(tmp_path) -> None:
    """docs/coreml.md and `diffusiond convert --help` say split_einsum is the default."""
    from diffusiond.daemon.cli import main
    from diffusiond.daemon.coreml.converter import convert

    assert main(["convert", "tiny", "--out", str(tmp_path / "cli"), "--parts", "TextEncoder"]) == 0
    convert("tiny", tmp_path / "api", progress=lambda _: None, parts=("TextEncoder",))
    for folder in ("cli", "api"):
        assert json.loads((tmp_path / folder / "diffusiond.json").read_text())["attention"] == "split_einsum", folder
    assert inspect.signature(convert).parameters["attention"].default == "split_einsum"
