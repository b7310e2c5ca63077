"""A Core ML model folder in Apple's layout, its networks' declared inputs and outputs, and the
facts the pipeline reads from it.

The shapes come from each network's own description: a compiled .mlmodelc says them in its
metadata.json, an .mlpackage in its spec. Only declared inputs are relied on: Apple's compiled
models declare their outputs with an empty shape (`"shape": "[]"`). The latent size and channels
come from the Unet's `sample`, the VAE's factor from VAEEncoder's `x` against it (8 without an
encoder). What no shape tells — the VAE's scaling factor and the scheduler config — comes from
`diffusiond.json`, which `diffusiond convert` writes; Apple's published models (Stable Diffusion
1.x and 2 base) lack it and get Stable Diffusion's.

Only SD 1.x/2.x folders are supported: SDXL (TextEncoder2), SD3 (MultiModalDiffusionTransformer)
and ControlNet (ControlledUnet, extra Unet inputs) are refused at open, naming what is found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import ModelInvalid
from .family import SD

FACTS_FILE = "diffusiond.json"
PARTS = ("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder", "SafetyChecker")  # what `diffusiond convert` makes
# Compiled models are named TextEncoder.mlmodelc …; packages Stable_Diffusion_version_<name>_text_encoder.mlpackage.
PART_SUFFIXES = {
    "TextEncoder": "text_encoder", "Unet": "unet", "UnetChunk1": "unet_chunk1", "UnetChunk2": "unet_chunk2",
    "VAEDecoder": "vae_decoder", "VAEEncoder": "vae_encoder", "SafetyChecker": "safety_checker",
}
# Stable Diffusion 1.x and 2 base ship this scheduler config and scaling factor.
SD_FACTS: dict[str, Any] = {
    "scaling_factor": 0.18215,
    "scheduler_config": {
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "clip_sample": False, "prediction_type": "epsilon",
    },
}
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
DEFAULT_VAE_SCALE_FACTOR = 8  # every Stable Diffusion VAE; used when no VAEEncoder tells
# Networks of the families not supported yet, by the names torch2coreml.py gives them.
UNSUPPORTED = {
    "TextEncoder2": "Stable Diffusion XL", "UnetRefiner": "Stable Diffusion XL (refiner)",
    "MultiModalDiffusionTransformer": "Stable Diffusion 3", "ControlledUnet": "ControlNet",
    "ControlledUnetChunk1": "ControlNet",
}
_UNSUPPORTED_PACKAGES = {"TextEncoder2": "text_encoder_2", "UnetRefiner": "refiner", "MultiModalDiffusionTransformer": "mmdit",
                         "ControlledUnet": "control-unet", "ControlledUnetChunk1": "control-unet_chunk1"}
_PALETTE_OP = "constexprLutToDense"  # in a compiled ML program's op histogram: palettized weights (macOS 14)
_SPEC_DTYPES = {"FLOAT32": "float32", "FLOAT16": "float16", "DOUBLE": "float64", "INT32": "int32", "INT8": "int8"}
_METADATA_DTYPES = {"Float32": "float32", "Float16": "float16", "Double": "float64", "Int32": "int32"}


@dataclass(frozen=True)
class Port:
    """One declared input or output of a network."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # a NumPy dtype name


@dataclass(frozen=True)
class Description:
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]  # shapes may be empty (Apple's compiled models): read names only
    palettized: bool = False

    def input(self, name: str) -> Port:
        return _port(self.inputs, name)

    def output(self, name: str) -> Port:
        return _port(self.outputs, name)


def _port(ports: tuple[Port, ...], name: str) -> Port:
    for port in ports:
        if port.name == name:
            return port
    raise ModelInvalid(f"the model declares no {name!r}; it has {', '.join(p.name for p in ports)}")


def description_from_spec(spec: Any) -> Description:
    """The ports a Core ML spec (protobuf Model) declares."""
    from coremltools.proto import FeatureTypes_pb2

    names = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType

    def ports(features: Any) -> tuple[Port, ...]:
        return tuple(
            Port(f.name, tuple(int(d) for d in f.type.multiArrayType.shape),
                 _SPEC_DTYPES[names.Name(f.type.multiArrayType.dataType)])
            for f in features
        )

    return Description(ports(spec.description.input), ports(spec.description.output))


def description_from_metadata(metadata: list[dict[str, Any]]) -> Description:
    """The ports a compiled model's metadata.json declares (`inputSchema`, `outputSchema`)."""

    def ports(schema: list[dict[str, Any]]) -> tuple[Port, ...]:
        return tuple(
            Port(p["name"], tuple(json.loads(p["shape"])), _METADATA_DTYPES[p["dataType"]])
            for p in schema if p.get("type", "MultiArray") == "MultiArray"
        )

    entry = metadata[0]
    histogram = entry.get("mlProgramOperationTypeHistogram", {})
    return Description(ports(entry["inputSchema"]), ports(entry["outputSchema"]),
                       any(op.endswith(_PALETTE_OP) for op in histogram))


def describe(path: Path) -> Description:
    """A network's declared ports, from a compiled .mlmodelc or an .mlpackage."""
    try:
        if path.suffix == ".mlmodelc":
            return description_from_metadata(json.loads((path / "metadata.json").read_text()))
        import coremltools as ct

        return description_from_spec(ct.utils.load_spec(str(path)))
    except ImportError:
        raise ModelInvalid(f"reading {path.name} needs coremltools: pip install 'diffusiond[coreml]'") from None
    except (OSError, ValueError, KeyError, IndexError, RuntimeError) as exc:  # RuntimeError: no package manifest
        raise ModelInvalid(f"cannot read the description of {path}: {exc}") from exc


def _find(folder: Path, part: str, suffix: str) -> Path | None:
    compiled = folder / f"{part}.mlmodelc"
    if compiled.is_dir():
        return compiled
    return next(iter(sorted(folder.glob(f"*_{suffix}.mlpackage"))), None)


def find_parts(folder: Path) -> dict[str, Path]:
    """Each network in `folder` by its Apple name; a compiled model beats a package of the same part.
    With both a Unet and its two chunks (Apple's 1.4 split_einsum, the pcuenq archives) only the
    chunks, as Apple's pipeline loads them: loading both costs ~1.7 GB and another compile."""
    parts = {part: path for part, suffix in PART_SUFFIXES.items() if (path := _find(folder, part, suffix))}
    if {"UnetChunk1", "UnetChunk2"} <= parts.keys():
        parts.pop("Unet", None)
    return parts


def unsupported(folder: Path, parts: dict[str, Description]) -> list[str]:
    """What makes a Core ML folder another family than SD 1.x/2.x: the networks, the Unet's extra inputs."""
    found = [f"{family} ({part})" for part, family in UNSUPPORTED.items()
             if _find(folder, part, _UNSUPPORTED_PACKAGES[part])]
    unet = parts.get("Unet") or parts.get("UnetChunk1")
    extra = [p.name for p in unet.inputs if p.name not in UNET_INPUTS] if unet else []
    if extra:
        found.append(f"a Unet that takes {', '.join(extra)} beyond {', '.join(UNET_INPUTS)}")
    return found


def find_tokenizer(path: Path) -> Path | None:
    """Where vocab.json and merges.txt lie: the models' own folder, else up to three above (a repo's top)."""
    for folder in (path, *list(path.parents)[:3]):
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return folder
    return None


def is_coreml_folder(folder: Path) -> bool:
    parts = find_parts(folder)
    return "TextEncoder" in parts and ("Unet" in parts or "UnetChunk1" in parts)


@dataclass(frozen=True)
class CoreMLFolder:
    """The facts the pipeline reads, like ModelFolder's, for a folder of Core ML models."""

    path: Path
    name: str
    runtime = "coreml"
    fixed_size = True  # Core ML models take the one size they were converted for
    family = SD  # ModelFolder's model facts, with Stable Diffusion 1.x/2.x's values
    force_zeros_for_empty_prompt = False
    requires_aesthetics_score = False

    @classmethod
    def open(cls, path: Path, name: str) -> CoreMLFolder:
        folder = cls(path.resolve(), name)
        parts = folder.parts
        missing = [p for p in ("TextEncoder", "VAEDecoder") if p not in parts]
        if "Unet" not in parts and not {"UnetChunk1", "UnetChunk2"} <= parts.keys():
            missing.append("Unet (or UnetChunk1 and UnetChunk2)")
        if find_tokenizer(folder.path) is None:
            missing.append("vocab.json and merges.txt")
        if missing:
            raise ModelInvalid(f"Core ML model {name} lacks {', '.join(missing)} in {folder.path}")
        others = unsupported(folder.path, {p: folder.descriptions[p] for p in ("Unet", "UnetChunk1") if p in parts})
        if others:
            raise ModelInvalid(f"Core ML model {name} is not supported yet: it has {'; '.join(others)}. "
                               f"Core ML runs Stable Diffusion 1.x and 2.x; use a diffusers-format model with the torch runtime")
        return folder

    @cached_property
    def parts(self) -> dict[str, Path]:
        return find_parts(self.path)

    @cached_property
    def descriptions(self) -> dict[str, Description]:
        return {part: describe(path) for part, path in self.parts.items()}

    @cached_property
    def facts(self) -> dict[str, Any]:
        file = self.path / FACTS_FILE
        if not file.is_file():
            return SD_FACTS
        try:
            return {**SD_FACTS, **json.loads(file.read_text())}
        except (OSError, ValueError) as exc:
            raise ModelInvalid(f"model {self.name}: cannot read {FACTS_FILE}: {exc}") from exc

    @property
    def _sample(self) -> Port:
        return self.descriptions["Unet" if "Unet" in self.parts else "UnetChunk1"].input("sample")

    @property
    def vae_scale_factor(self) -> int:
        """Image rows per latent row: VAEEncoder's `x` against the Unet's `sample` (outputs may declare no shape)."""
        if "VAEEncoder" not in self.parts:
            return DEFAULT_VAE_SCALE_FACTOR
        return self.descriptions["VAEEncoder"].input("x").shape[-2] // self._sample.shape[-2]

    @property
    def palettized(self) -> bool:
        """Palettized weights (6-bit lookup tables): Core ML runs them from macOS 14 on."""
        return bool(self.facts.get("palettized")) or any(d.palettized for d in self.descriptions.values())

    @property
    def latent_channels(self) -> int:
        return self._sample.shape[1]

    @property
    def default_shape(self) -> tuple[int, int]:
        """(width, height): the one size the models were converted for, from the Unet's sample port."""
        return self._sample.shape[-1] * self.vae_scale_factor, self._sample.shape[-2] * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        return float(self.facts["scaling_factor"])

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self.facts["scheduler_config"]

    @cached_property
    def tokenizer_dirs(self) -> tuple[Path, ...]:
        """The folder with vocab.json and merges.txt (the models' own, else the repo's top, two up),
        once per text encoder."""
        folder = find_tokenizer(self.path)
        if folder is None:
            raise ModelInvalid(f"Core ML model {self.name} lacks vocab.json and merges.txt in {self.path}")
        return (folder,)

    @property
    def has_safety_checker(self) -> bool:
        return "SafetyChecker" in self.parts

    @property
    def feature_extractor_dir(self) -> Path | None:
        """The safety checker's preprocessing the converter copies; None: CLIP's standard (Apple's)."""
        return self.path if (self.path / "preprocessor_config.json").is_file() else None
