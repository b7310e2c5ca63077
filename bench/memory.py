"""Memory per model family, against diffusers' own pipelines measured side by side in this run.

1. Measured: the peak resident memory of one process that loads a tiny model and draws one image,
   our TorchRuntime pipeline vs diffusers' pipeline for the same folder (each in a fresh process,
   less that process's memory after its imports), for the shipped tiny SD and the tests' tiny SDXL.
2. Stated for the real models: the weights' bytes from their parameter counts, counted by
   instantiating each part on PyTorch's meta device from the published configs (no download):
   SD 1.5, SDXL base 1.0 and the SDXL refiner, at float16 (a GPU, the Hub's fp16 variant) and
   float32 (the CPU). Activations come on top: they grow with the image size and the batch.

    python bench/memory.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import build_tiny_sdxl  # noqa: E402  (the tests' tiny SDXL, built the same way here)

PROMPT = "a lighthouse at dusk, oil painting"

# Runs in a fresh process: the peak RSS of loading and one 2-step image, less the RSS after imports.
MEASURE = """
import json, resource, sys
import diffusers, torch
from diffusiond.daemon.config import Config
from diffusiond.daemon.engine.pipeline import Pipeline, Request
from diffusiond.daemon.engine.runtimes import open_runtime
from diffusiond.daemon.models.diffusers_folder import ModelFolder
torch.set_num_threads(1)
which, path, prompt = sys.argv[1:4]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = ModelFolder.open(path)
if which == "ours":
    Pipeline(model, open_runtime(model, Config(device="cpu"), False)).generate(Request(prompt, steps=2, seed=1))
else:
    cls = diffusers.StableDiffusionPipeline if model.family == "sd" else diffusers.StableDiffusionXLPipeline
    extra = {"safety_checker": None} if model.family == "sd" else {"add_watermarker": False}
    pipe = cls.from_pretrained(model.path, **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np")
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024))
"""


def peak_bytes(which: str, path: str) -> int:
    out = subprocess.run([sys.executable, "-c", MEASURE, which, path, PROMPT], capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def measured() -> None:
    print("peak resident memory of loading + one 2-step image, CPU, float32 (fresh process each)")
    print(f"  {'model':<10} {'diffusiond':>11} {'diffusers':>11} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as folder:
        models = {"tiny SD": "tiny", "tiny SDXL": str(build_tiny_sdxl.build(Path(folder) / "tiny-sdxl"))}
        for name, path in models.items():
            ours, theirs = peak_bytes("ours", path), peak_bytes("diffusers", path)
            print(f"  {name:<10} {ours / 2**20:8.1f} MiB {theirs / 2**20:8.1f} MiB {ours / theirs:7.3f}")


# The published configs, reduced to what sets the parameter count (stable-diffusion-v1-5,
# stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0: unet/, text_encoder*/, vae/ config.json).
VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "vocab_size": 49408}
CLIP_BIG_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
              "projection_dim": 1280, "vocab_size": 49408, "hidden_act": "gelu"}
SDXL_UNET = {"block_out_channels": [320, 640, 1280], "layers_per_block": 2, "cross_attention_dim": 2048,
             "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
             "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
# The refiner: generative-models' sd_xl_refine.yaml, transformer_depth [0, 4, 4, 0] (attention in the middle two levels).
REFINER_UNET = {**SDXL_UNET, "block_out_channels": [384, 768, 1536, 1536], "cross_attention_dim": 1280,
                "transformer_layers_per_block": 4, "attention_head_dim": [6, 12, 24, 24],
                "projection_class_embeddings_input_dim": 2560,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
SD_UNET = {"cross_attention_dim": 768}  # UNet2DConditionModel's defaults are SD 1.x's
REAL = {
    "SD 1.5": {"unet": SD_UNET, "text_encoder": CLIP_L, "vae": VAE},
    "SDXL base 1.0": {"unet": SDXL_UNET, "text_encoder": CLIP_L, "text_encoder_2": CLIP_BIG_G, "vae": VAE},
    "SDXL refiner 1.0": {"unet": REFINER_UNET, "text_encoder_2": CLIP_BIG_G, "vae": VAE},
}


def parameters(part: str, config: dict) -> int:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if part == "unet":
            module = UNet2DConditionModel(**config)
        elif part == "vae":
            module = AutoencoderKL(**config)
        else:
            cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
            module = cls(CLIPTextConfig(**config))
    return sum(p.numel() for p in module.parameters())


def stated() -> None:
    print("\nweights of the real models, from their parameter counts (activations come on top)")
    print(f"  {'model':<17} {'parameters':>14} {'float16':>9} {'float32':>9}   parts")
    for name, parts in REAL.items():
        counts = {part: parameters(part, config) for part, config in parts.items()}
        total = sum(counts.values())
        detail = ", ".join(f"{part} {n / 1e6:,.0f} M" for part, n in counts.items())
        print(f"  {name:<17} {total:>14,} {total * 2 / 2**30:6.2f} GiB {total * 4 / 2**30:6.2f} GiB   {detail}")


if __name__ == "__main__":
    print(f"peak RSS counted by getrusage ({resource.getpagesize()}-byte pages)\n")
    measured()
    stated()
