"""Pipeline benchmarks, each against a baseline measured side by side in this run.

1. Our pipeline vs diffusers' StableDiffusionPipeline on the shipped tiny model, and vs
   StableDiffusionXLPipeline on a tiny random SDXL (tests/build_tiny_sdxl.py): same prompt, size,
   steps and scheduler, both on the PyTorch CPU runtime. Target: ratio ≤ 1.0.
2. The pipeline's own per-step overhead with a runtime whose model calls return at once, at SD's
   512×512 (latents 2×4×64×64 with guidance) and SDXL's 1024×1024 (2×4×128×128, with the pooled
   text and size ids), against the same loop (guidance, scale, scheduler step) written with
   diffusers' torch schedulers, both drawing fresh noise from torch's generator. Target: ≤ 1 ms
   per step. Beside it, one fresh-noise draw from each generator: the default (numpy, Apple's
   order) costs more per ancestral step at SDXL's size than the loop itself.

    python bench/pipeline.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import torch

from diffusiond.daemon.engine import schedulers
from diffusiond.daemon.config import Config
from diffusiond.daemon.engine.noise import RNGS, noise_source
from diffusiond.daemon.engine.pipeline import Pipeline, Request
from diffusiond.daemon.engine.runtimes import TextEncoding, open_runtime
from diffusiond.daemon.models.diffusers_folder import ModelFolder
from diffusiond.daemon.models.family import SD

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import build_tiny_sdxl  # noqa: E402  (the tests' tiny SDXL, built the same way here)

PROMPT = "a lighthouse at dusk, oil painting"


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def side_by_side(first, second, repeats: int) -> tuple[float, float]:
    """Medians of two runs taken in turns, so a change in the machine's load hits both alike."""
    first(), second()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for run, spent in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            run()
            spent.append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def end_to_end(model: ModelFolder, repeats: int, steps: int, scheduler: str) -> None:
    ours = Pipeline(model, open_runtime(model, Config(device="cpu"), False))
    if model.family == SD:
        theirs = diffusers.StableDiffusionPipeline.from_pretrained(model.path, safety_checker=None)
    else:
        theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(model.path, add_watermarker=False)
    theirs.set_progress_bar_config(disable=True)
    cls = getattr(diffusers, schedulers.scheduler_class(scheduler).DIFFUSERS_CLASS)
    theirs.scheduler = cls.from_config(theirs.scheduler.config, **schedulers.overrides(scheduler))
    size = model.default_size
    request = Request(PROMPT, steps=steps, width=size, height=size, seed=1, scheduler=scheduler)
    t_ours, t_theirs = side_by_side(
        lambda: ours.generate(request),
        lambda: theirs(PROMPT, num_inference_steps=steps, height=size, width=size,
                       generator=torch.Generator().manual_seed(1), output_type="np"),
        repeats,
    )
    print(f"\nend to end, tiny {model.family} model {size}x{size}, {steps} steps {scheduler}, CPU, "
          f"torch threads {torch.get_num_threads()}")
    print(f"  diffusers {type(theirs).__name__:<26} {t_theirs * 1000:8.1f} ms/image")
    print(f"  diffusiond Pipeline                  {t_ours * 1000:8.1f} ms/image")
    print(f"  ratio ours/diffusers                 {t_ours / t_theirs:8.3f}   (target ≤ 1.0)")


class InstantRuntime:
    """Model calls that return preallocated zeros at once: what remains is the pipeline's own work.
    SD 1.5's text width, or SDXL's (both encoders side by side) with its pooled projection."""

    device_loop = False

    def __init__(self, sdxl: bool, factor: int) -> None:
        self.hidden, self.pooled = (2048, 1280) if sdxl else (768, None)
        self.factor = factor
        self._cache: dict[tuple, np.ndarray] = {}

    def _zeros(self, shape: tuple) -> np.ndarray:
        if shape not in self._cache:
            self._cache[shape] = np.zeros(shape, np.float32)
        return self._cache[shape]

    def encode_text(self, input_ids):
        rows, length = input_ids[0].shape
        pooled = None if self.pooled is None else self._zeros((rows, self.pooled))
        return TextEncoding(self._zeros((rows, length, self.hidden)), pooled)

    def predict_noise(self, sample, timestep, conditioning):
        return self._zeros(sample.shape)

    def decode(self, latents):
        b, _, h, w = latents.shape
        return self._zeros((b, 3, h * self.factor, w * self.factor))


def diffusers_loop_ms(name: str, config: dict, steps: int, latents: torch.Tensor) -> float:
    """diffusers' loop body per step (cat, scale, guidance, scheduler step) with an instant UNet."""
    source = getattr(diffusers, config["_class_name"]).from_config(config)
    cls = getattr(diffusers, schedulers.scheduler_class(name).DIFFUSERS_CLASS)
    scheduler = cls.from_config(source.config, **schedulers.overrides(name))
    zeros = torch.zeros((latents.shape[0] * 2, *latents.shape[1:]))
    generator = torch.Generator().manual_seed(0)

    def run() -> None:
        scheduler.set_timesteps(steps)
        x = latents * scheduler.init_noise_sigma
        extra = {"generator": generator} if "generator" in scheduler.step.__code__.co_varnames else {}
        for t in scheduler.timesteps:
            scheduler.scale_model_input(torch.cat([x] * 2), t)
            uncond, cond = zeros.chunk(2)
            x = scheduler.step(uncond + 7.5 * (cond - uncond), t, x, return_dict=False, **extra)[0]

    return median_seconds(run, 3) / len(scheduler.timesteps) * 1000


def overhead(model: ModelFolder, steps: int, latent: int) -> None:
    """At `latent`² latents: the tiny models' VAEs scale less than real ones, so the pixel size is
    chosen to give the real model's latents."""
    factor = model.vae_scale_factor
    pipeline = Pipeline(model, InstantRuntime(model.family != SD, factor))
    latents = torch.randn(1, 4, latent, latent)
    print(f"\nper-step overhead, {model.family} at {latent * 8}x{latent * 8} (latents 2x4x{latent}x{latent} with guidance), "
          f"{steps} steps, instant model calls")
    print(f"  {'scheduler':<16} {'diffusiond':>10} {'diffusers':>10} {'ratio':>7}")
    for name in schedulers.NAMES:
        n = 8 if name == "lcm" else steps
        # torch's generator, as the baseline draws with: the loop is measured, not the generator.
        request = Request(PROMPT, steps=n, width=latent * factor, height=latent * factor, seed=1, scheduler=name,
                          rng="torch")
        pipeline.generate(request)
        per_step = statistics.median(
            pipeline.generate(request).timings["denoise"] / n * 1000 for _ in range(3)
        )
        baseline = diffusers_loop_ms(name, model.scheduler_config, n, latents)
        print(f"  {name:<16} {per_step:8.3f}ms {baseline:8.3f}ms {per_step / baseline:7.3f}   (target ≤ 1 ms)")
    shape = (1, 4, latent, latent)
    draws = {rng: statistics.median(timed(noise_source(rng, 1), shape) for _ in range(5)) for rng in RNGS}
    print(f"  one fresh-noise draw per ancestral/LCM step at {shape}: "
          + ", ".join(f"rng {rng} {ms:.3f}ms" for rng, ms in draws.items())
          + " (numpy, the default, is Apple's RandomState order, so Mac seeds reproduce)")


def timed(noise: schedulers.Noise, shape: tuple[int, ...]) -> float:
    start = time.perf_counter()
    for _ in range(20):
        noise(shape)
    return (time.perf_counter() - start) / 20 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scheduler", default="dpmpp_2m", choices=schedulers.NAMES)
    args = parser.parse_args()
    sd = ModelFolder.open("tiny")
    with tempfile.TemporaryDirectory() as folder:
        opened = ModelFolder.open(str(build_tiny_sdxl.build(Path(folder) / "tiny-sdxl")))
        assert isinstance(opened, ModelFolder)
        sdxl: ModelFolder = opened
        for model in (sd, sdxl):
            end_to_end(model, args.repeats, args.steps, args.scheduler)
        overhead(sd, 50, 64)
        overhead(sdxl, 50, 128)


if __name__ == "__main__":
    main()
