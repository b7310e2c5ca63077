"""The cost of LoRAs on the torch runtime, against a job without one measured side by side.

On the shipped tiny model, jobs run in rounds — none, none, A, A, B, A, none — so that each kind
of job is timed right after the job it is meant to follow, and a change in the machine's load
hits every kind alike:

    base    a job without a LoRA after one without (the baseline: ratio 1)
    same    a job with LoRA A after one with A: the set stays applied (the adapters' own cost)
    switch  a job with B after one with A, or A after B: one set taken off, another put on
    off     a job without a LoRA after one with A: every adapter unloaded

The two LoRAs are random kohya-format files over the UNet's attention and the text encoder (rank 8).

    python bench/lora.py [--repeats 7] [--steps 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffusiond.daemon.config import Config
from diffusiond.daemon.engine.pipeline import Pipeline, Request
from diffusiond.daemon.engine.runtimes import open_runtime
from diffusiond.daemon.models.diffusers_folder import ModelFolder

PROMPT = "a lighthouse at dusk, oil painting"


def kohya_file(runtime, path: Path, seed: int, rank: int = 8) -> Path:
    """A random LoRA in kohya-ss/sd-scripts' naming (lora_unet_…, lora_te_…; lora_down, lora_up, alpha)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    targets = [("lora_unet", name, m) for name, m in runtime.unet.named_modules()
               if isinstance(m, torch.nn.Linear) and ".transformer_blocks." in name]
    targets += [("lora_te", f"text_model.{name}".replace("text_model.text_model.", "text_model."), m)
                for name, m in runtime.text_encoders[0].named_modules()
                if isinstance(m, torch.nn.Linear) and name.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))]
    for prefix, name, module in targets:
        key = f"{prefix}.{name}".replace(".", "_")
        state[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.1
        state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.1
        state[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model = ModelFolder.open("tiny")
    assert isinstance(model, ModelFolder)
    with tempfile.TemporaryDirectory() as folder:
        runtime = open_runtime(model, Config(device=args.device), False)
        kohya_file(runtime, Path(folder) / "a.safetensors", 1)
        kohya_file(runtime, Path(folder) / "b.safetensors", 2)
        pipeline = Pipeline(model, runtime, lora_dir=Path(folder))
        sets = {"none": (), "A": (("a", 0.8),), "B": (("b", 0.8),)}

        def job(name: str) -> float:
            request = Request(PROMPT, steps=args.steps, seed=1, loras=sets[name])
            started = time.perf_counter()
            pipeline.generate(request)
            return time.perf_counter() - started

        times: dict[str, list[float]] = {"base": [], "same": [], "switch": [], "off": []}
        job("none"), job("A"), job("none")  # warm-up: first loads, first calls
        for _ in range(args.repeats):
            job("none")
            times["base"].append(job("none"))
            job("A")
            times["same"].append(job("A"))
            times["switch"].append(job("B"))
            times["switch"].append(job("A"))
            times["off"].append(job("none"))

    base = statistics.median(times["base"])
    print(f"tiny model, {args.steps} steps, 64x64, device {runtime.device}, {args.repeats} rounds (medians)")
    for kind, spent in times.items():
        seconds = statistics.median(spent)
        print(f"  {kind:<7} {seconds * 1000:8.1f} ms   ratio {seconds / base:5.2f}   (+{(seconds - base) * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
