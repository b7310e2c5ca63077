"""Score a model on held-out captions: the daemon's own engine draws, the procedural judge grades.

    python -m diffusiond.daemon.models.scenes.evaluate [--model daemon/models/shapes] [--count 200]

Each caption names all five attributes of a scene whose (shape, colour, background) triple was
never drawn in training; the request is otherwise the daemon's defaults (steps, guidance,
scheduler), one seed per caption. Prints each attribute's agreement and the shape confusion.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from PIL import Image

from ...engine.pipeline import Pipeline, Request
from ...engine.runtimes.torch_runtime import TorchRuntime
from ..diffusers_folder import ModelFolder
from . import judge, scene
from .train import OUT


def evaluate(model: Path, count: int, seed: int, device: str) -> judge.Tally:
    folder = ModelFolder.open(str(model))
    pipeline = Pipeline(folder, TorchRuntime(folder.path, device))
    tally = judge.Tally()
    for i, (s, _) in enumerate(itertools.islice(scene.samples(seed, held_out=True), count)):
        asked = scene.full_caption(s)
        result = pipeline.generate(Request(prompt=asked.text, seed=seed + i, safety_checker=False))
        tally.add(Image.fromarray(result.images[0]), asked.named)
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=OUT)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    print(evaluate(args.model, args.count, args.seed, args.device).report())


if __name__ == "__main__":
    main()
