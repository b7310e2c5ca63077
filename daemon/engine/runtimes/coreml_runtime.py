"""The Core ML runtime: Apple's layout on a Mac's GPU or Neural Engine. Load, predict, nothing else.

The networks take fixed shapes (Apple's: TextEncoder and the VAE one image at a time, the Unet
two latents, unconditional and conditional), declared in each one's description. The feeds are
built from those declarations — batches cut or padded to the declared batch, arrays cast to the
declared dtype, the text hidden states moved to (B, C, 1, 77) — and everything up to
`MLModel.predict` is plain NumPy, tested on any platform against converted models' specs.

SDXL as Apple's StableDiffusionXLPipeline.swift runs it: TextEncoder and TextEncoder2 each give
`hidden_embeds` (their penultimate hidden states) and `pooled_outputs`; the Unet takes both
hidden_embeds side by side and the last encoder's pooled_outputs as `text_embeds`, with `time_ids`.
The refiner has TextEncoder2 only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from diffusiond.clients.protocol import COMPUTE_UNITS

from ...errors import InvalidParameter, ModelInvalid
from ...models.coreml_folder import CoreMLFolder, Description
from . import Conditioning, TextEncoding

if TYPE_CHECKING:
    from ...models.lora import LoraFile
    from ..linear_steps import LinearPlan
    from . import BeforeStep, StepCallback

# coremltools' ComputeUnit for each of our names (clients.protocol.COMPUTE_UNITS)
_CORE_ML_NAMES = {"cpuAndGPU": "CPU_AND_GPU", "cpuAndNeuralEngine": "CPU_AND_NE", "all": "ALL", "cpuOnly": "CPU_ONLY"}
Feed = dict[str, np.ndarray]


def batches(description: Description, arrays: Feed) -> Iterator[tuple[Feed, int]]:
    """Feeds of the declared batch size, each with how many of its rows are real: the arrays are
    cut along their first axis, the last piece padded by repeating its last row, and each array
    cast to the declared dtype; a shape the model does not take is refused, naming the input."""
    rows = len(next(iter(arrays.values())))
    size = description.inputs[0].shape[0]
    for start in range(0, rows, size):
        real = min(size, rows - start)
        feed = {}
        for name, array in arrays.items():
            port = description.input(name)
            piece = array[start:start + real]
            if real < size:
                piece = np.concatenate([piece, np.repeat(piece[-1:], size - real, axis=0)])
            if len(port.shape) == 1 and piece.ndim == 2 and piece.size == port.shape[0]:
                piece = piece.reshape(port.shape)  # Apple's first SDXL Unets: time_ids (12,) for two rows of 6
            if piece.shape != port.shape:
                raise InvalidParameter(name, f"the model takes {port.shape}, got {piece.shape} (per {size} rows)")
            feed[name] = np.ascontiguousarray(piece, dtype=port.dtype)
        yield feed, real


def text_encoder_inputs(description: Description, input_ids: np.ndarray) -> Iterator[tuple[Feed, int]]:
    """(B, 77) int64 token ids → TextEncoder feeds (`input_ids`, float32 in Apple's models)."""
    return batches(description, {"input_ids": input_ids})


def unet_inputs(
    description: Description, sample: np.ndarray, timestep: np.ndarray, conditioning: Conditioning
) -> Iterator[tuple[Feed, int]]:
    """Latents, a timestep (scalar or per row) and the conditioning → Unet feeds with `timestep` per
    row, `encoder_hidden_states` in (B, C, 1, 77), and SDXL's `text_embeds` and `time_ids` where the
    Unet declares them."""
    timesteps = np.broadcast_to(np.asarray(timestep, dtype=np.float32), (len(sample),))
    arrays = {
        "sample": sample, "timestep": timesteps,
        "encoder_hidden_states": conditioning.hidden.transpose(0, 2, 1)[:, :, None, :],
    }
    declared = {p.name for p in description.inputs}
    for name, array in (("text_embeds", conditioning.text_embeds), ("time_ids", conditioning.time_ids)):
        if name not in declared:
            continue
        if array is None:
            raise InvalidParameter(name, "this Core ML model is SDXL: its Unet takes text_embeds and time_ids, "
                                         "and the conditioning has none")
        arrays[name] = array
    return batches(description, arrays)


def chunk_inputs(description: Description, feed: Feed, first_outputs: Feed) -> Feed:
    """UnetChunk2's feed: each input it declares, from chunk 1's outputs or else the Unet's own feed."""
    available = {**feed, **first_outputs}
    missing = [p.name for p in description.inputs if p.name not in available]
    if missing:
        raise ModelInvalid(f"UnetChunk2 takes {', '.join(missing)}, which neither chunk 1 nor the Unet's inputs give")
    return {p.name: np.ascontiguousarray(available[p.name], dtype=p.dtype) for p in description.inputs}


def safety_inputs(description: Description, clip_input: np.ndarray, images: np.ndarray) -> Iterator[tuple[Feed, int]]:
    """CLIP pixels and (B, H, W, 3) images → SafetyChecker feeds with no threshold `adjustment`."""
    return batches(description, {
        "clip_input": clip_input, "images": images, "adjustment": np.zeros(len(images), dtype=np.float32),
    })


def joined(outputs: list[tuple[Feed, int]], name: str) -> np.ndarray:
    """One output across the feeds, padding rows dropped, as float32 (bool stays bool)."""
    pieces = [np.asarray(out[name])[:real] for out, real in outputs]
    array = np.concatenate(pieces)
    return array if array.dtype == bool else array.astype(np.float32)


def _load(path: Path, compute_units: str, name: str) -> Any:
    """The one macOS-only call: Core ML compiles the model for this device (slow the first time).
    Its result's `predict(feed)` is the other; tests off a Mac replace this function (tests/coreml_stand_in.py)."""
    if sys.platform != "darwin":
        raise ModelInvalid(f"{name} is a Core ML model: it runs on macOS only; on this machine use "
                           f"its diffusers-format original with the torch runtime")
    import coremltools as ct

    units = ct.ComputeUnit[_CORE_ML_NAMES[compute_units]]
    if path.suffix == ".mlmodelc":
        return ct.models.CompiledMLModel(str(path), units)
    return ct.models.MLModel(str(path), compute_units=units)


class CoreMLRuntime:
    # Core ML predicts one network call at a time from the host, and compiles its models at load.
    device_loop = False
    has_warm_up = False

    def __init__(self, model: CoreMLFolder, compute_units: str, with_safety_checker: bool = False) -> None:
        if compute_units not in COMPUTE_UNITS:
            raise ModelInvalid(f"unknown compute units {compute_units!r}; choose one of {', '.join(COMPUTE_UNITS)}")
        wanted = [p for p in model.parts if p != "SafetyChecker" or with_safety_checker]
        self.described = model.descriptions
        self.text_encoders = model.text_encoders
        self.models = {part: _load(model.parts[part], compute_units, model.name) for part in wanted}

    def _run(self, part: str, feeds: Iterator[tuple[Feed, int]]) -> list[tuple[Feed, int]]:
        return [(self.models[part].predict(feed), real) for feed, real in feeds]

    def encode_text(self, input_ids: Sequence[np.ndarray]) -> TextEncoding:
        if len(input_ids) != len(self.text_encoders):
            raise ModelInvalid(f"this Core ML model has {len(self.text_encoders)} text encoders "
                               f"({', '.join(self.text_encoders)}); got token ids for {len(input_ids)}")
        if self.text_encoders == ("TextEncoder",):  # Stable Diffusion 1.x/2.x
            outputs = self._run("TextEncoder", text_encoder_inputs(self.described["TextEncoder"], input_ids[0]))
            return TextEncoding(joined(outputs, "last_hidden_state"))
        encoded = [self._run(part, text_encoder_inputs(self.described[part], ids))
                   for part, ids in zip(self.text_encoders, input_ids)]
        hidden = np.concatenate([joined(outputs, "hidden_embeds") for outputs in encoded], axis=2)
        return TextEncoding(hidden, joined(encoded[-1], "pooled_outputs"))

    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, conditioning: Conditioning) -> np.ndarray:
        if "Unet" in self.models:
            feeds = unet_inputs(self.described["Unet"], sample, timestep, conditioning)
            return joined(self._run("Unet", feeds), "noise_pred")
        outputs = []
        for feed, real in unet_inputs(self.described["UnetChunk1"], sample, timestep, conditioning):
            first = self.models["UnetChunk1"].predict(feed)
            second = chunk_inputs(self.described["UnetChunk2"], feed, first)
            outputs.append((self.models["UnetChunk2"].predict(second), real))
        return joined(outputs, "noise_pred")

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return joined(self._run("VAEDecoder", batches(self.described["VAEDecoder"], {"z": latents})), "image")

    def encode(self, images: np.ndarray) -> np.ndarray:
        if "VAEEncoder" not in self.models:
            raise InvalidParameter("init_image", "this Core ML model has no VAEEncoder, so it cannot start from an image")
        return joined(self._run("VAEEncoder", batches(self.described["VAEEncoder"], {"x": images})), "latent")

    def check_safety(self, clip_input: np.ndarray, images: np.ndarray) -> np.ndarray:
        outputs = self._run("SafetyChecker", safety_inputs(self.described["SafetyChecker"], clip_input, images))
        return joined(outputs, "has_nsfw_concepts").astype(bool)

    def denoise(self, latents: np.ndarray, conditioning: Conditioning, plan: LinearPlan, guidance: float | None,
                before_step: BeforeStep, on_step: StepCallback | None) -> np.ndarray:
        raise NotImplementedError("Core ML has no device loop (device_loop is False): the pipeline runs the steps")

    def set_loras(self, loras: Sequence[tuple[LoraFile, float]]) -> None:
        if loras:  # resolve() refuses a LoRA on a Core ML model before a job gets here
            raise InvalidParameter("loras", "a Core ML model cannot take a LoRA at run time")

    def warm_up(self, width: int, height: int, count: int = 1, steps: int = 25) -> float:
        return 0.0
