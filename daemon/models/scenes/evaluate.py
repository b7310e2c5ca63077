"""Score a model on held-out captions: the daemon's own engine draws, the procedural judge grades.

    python -m diffusiond.daemon.models.scenes.evaluate [--model daemon/models/shapes] [--count 200]
                                                       [--hearing | --round-trip]

Each caption names all five attributes of a scene whose (shape, colour, background) triple was
never drawn in training; the request is otherwise the daemon's defaults (steps, guidance,
scheduler), one seed per caption. Prints each attribute's agreement and the shape confusion.

`--hearing` says instead which words the model listens to where it must: at the noisiest step the
input holds no image, so only the caption can say where and what the shape is. For each attribute
it swaps that attribute's words in the caption and measures how far the UNet's prediction moves,
against swapping the whole caption. A share near 0 means the model does not hear those words at
all, which no amount of sampling can mend (docs/toy-model.md, "What went wrong first", 3).

`--round-trip` grades the held-out scenes themselves after the model's VAE encodes and decodes
them: the most any UNet on that VAE can score.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from ...engine.pipeline import Pipeline, Request
from ...engine.runtimes.torch_runtime import TorchRuntime
from ..diffusers_folder import ModelFolder
from . import judge, scene
from .train import OUT, TIMESTEPS, to_pixels, token_ids


def evaluate(model: Path, count: int, seed: int, device: str) -> judge.Tally:
    folder = ModelFolder.open(str(model))
    pipeline = Pipeline(folder, TorchRuntime(folder.path, device))
    tally = judge.Tally()
    for i, (s, _) in enumerate(itertools.islice(scene.samples(seed, held_out=True), count)):
        asked = scene.full_caption(s)
        result = pipeline.generate(Request(prompt=asked.text, seed=seed + i, safety_checker=False))
        tally.add(Image.fromarray(result.images[0]), asked.named)
    return tally


@torch.no_grad()
def round_trip(model: Path, count: int, seed: int) -> judge.Tally:
    vae = AutoencoderKL.from_pretrained(model / "vae").eval()
    tally = judge.Tally()
    for s, _ in itertools.islice(scene.samples(seed, held_out=True), count):
        pixels = to_pixels([np.asarray(scene.render(s))])
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample[0]
        image = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        tally.add(Image.fromarray(image), scene.full_caption(s).named)
    return tally


def swapped(s: scene.Scene, attribute: str, rng: np.random.Generator) -> scene.Scene:
    """The scene with one attribute changed to another value (the shape's colour never the background's)."""
    choices = {"shape": scene.SHAPES, "colour": scene.COLOURS, "background": scene.COLOURS, "size": scene.SIZES,
               "position": scene.POSITIONS}[attribute]
    taken = {getattr(s, attribute), s.background if attribute == "colour" else s.colour}
    values = [value for value in choices if value not in taken]
    changed: dict[str, Any] = {attribute: values[rng.integers(len(values))]}
    return replace(s, **changed)


@torch.no_grad()
def hearing(model: Path, count: int, seed: int) -> dict[str, float]:
    """Each attribute's share of the prediction's movement at the noisiest step when its words are swapped,
    against swapping the whole caption for another scene's (1: as much as a new caption)."""
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(model / "unet").eval()
    rng = np.random.default_rng(seed)
    noisiest = TIMESTEPS - 1
    scenes = [s for s, _ in itertools.islice(scene.samples(seed), count)]
    others = [s for s, _ in itertools.islice(scene.samples(seed + 1), count)]

    def predict(chosen: list[scene.Scene]) -> torch.Tensor:
        ids = token_ids(tokenizer, [scene.full_caption(s).text for s in chosen])
        size = unet.config.sample_size
        noise = torch.randn(len(chosen), unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
        return unet(noise, torch.full((len(chosen),), noisiest), text_encoder(ids)[0]).sample

    base = predict(scenes)
    whole = (predict(others) - base).pow(2).mean()
    return {attribute: float((predict([swapped(s, attribute, rng) for s in scenes]) - base).pow(2).mean() / whole)
            for attribute in scene.ATTRIBUTES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=OUT)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--hearing", action="store_true", help="which words move the prediction at the noisiest step")
    mode.add_argument("--round-trip", action="store_true", help="grade the scenes after the VAE alone")
    args = parser.parse_args()
    if not (args.model / "model_index.json").is_file():
        parser.error(f"{args.model} is not a trained model folder: train one first (train.py --out FOLDER)")
    if args.round_trip:
        print(round_trip(args.model, args.count, args.seed).report())
    elif args.hearing:
        for attribute, share in hearing(args.model, args.count, args.seed).items():
            print(f"{attribute:<10} {share:6.3f}")
    else:
        print(evaluate(args.model, args.count, args.seed, args.device).report())


if __name__ == "__main__":
    main()
