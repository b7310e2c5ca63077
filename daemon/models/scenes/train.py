"""Train the `shapes` model on the scene world: the VAE first, then the UNet and text encoder, then
those two again at the noise levels where a shape's corners are decided.

    python -m diffusiond.daemon.models.scenes.train [--config train.toml] [--out daemon/models/shapes]
                                                    [--vae FOLDER | --denoiser FOLDER]

`--vae` takes stage 1's result from an earlier run (a diffusers AutoencoderKL folder, such as the
shipped model's vae/) and runs stages 2 and 3: the UNet and text encoder are what changes between
tries. `--denoiser` takes a stage 2 result (the `OUT.step-N` folder stage 2 leaves at its end) and
runs stage 3 alone.

Built from diffusers' and PyTorch's own pieces (AutoencoderKL, UNet2DConditionModel,
CLIPTextModel, DDPMScheduler.add_noise, EMAModel, get_scheduler, AdamW), fixed seeds, and written
as a diffusers folder that StableDiffusionPipeline loads unchanged. Runs on CUDA where there is one,
else on the CPU (docs/toy-model.md has the timings).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..facts import FACTS_FILE
from . import scene

TIMESTEPS = 1000  # training timesteps, t = 0 … TIMESTEPS − 1
HERE = Path(__file__).resolve().parent
CONFIG = HERE / "train.toml"
OUT = HERE.parent / "shapes"
TOKENIZER = HERE.parent / "tiny" / "tokenizer"  # the tiny model's cut-down CLIP BPE (tests/build_tiny_model.py)
# Stable Diffusion 1.5's betas rescaled to zero terminal SNR, predicting v (Lin et al. 2023, "Common
# Diffusion Noise Schedules and Sample Steps are Flawed"). On 16 × 16 latents SD's own schedule leaves
# a flat background readable through the noise at t = 999, so the model learnt to take the background
# from the noise instead of the caption; at zero SNR the last step holds no image, only the text.
SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": TIMESTEPS,
            "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}


def load_config(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def batch(rng: np.random.Generator, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`size` training scenes as a tensor in [-1, 1] (N, 3, H, W), each one's shape mask (N, 1, H, W:
    1 where a pixel is not the background's colour), and one caption each."""
    images, masks, captions = [], [], []
    for _ in range(size):
        s = scene.random_scene(rng)
        image = np.asarray(scene.render(s))
        images.append(image)
        masks.append(np.abs(image.astype(np.int16) - scene.COLOURS[s.background]).sum(axis=-1) > 24)
        captions.append(scene.caption(s, rng).text)
    mask = torch.from_numpy(np.stack(masks)).unsqueeze(1).float()
    return to_pixels(images).to(device), mask.to(device), captions


def to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """RGB images (H, W, 3, uint8) as the VAE takes them: (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """MSE with each element's error counted `weight` times, normalised so the weights set the balance, not the scale."""
    return (weight * (prediction - target) ** 2).mean() / weight.mean()


def latent_weight(mask: torch.Tensor, factor: int, foreground_weight: float, outline_weight: float) -> torch.Tensor:
    """The denoiser loss's weight per latent, from the shape's pixel mask pooled by the VAE's `factor`.

    Latents under the shape count `foreground_weight` times: it is 2–9 % of a scene's pixels, so a
    plain mean lets the background's error drown it. Latents on its outline (covered only in part:
    max-pooled minus min-pooled) count `outline_weight` more: that is where a square and a circle of
    one area differ, a few per cent of the latents (docs/toy-model.md, run 10)."""
    cover = F.max_pool2d(mask, factor)
    inside = -F.max_pool2d(-mask, factor)
    return 1 + (foreground_weight - 1) * cover + outline_weight * (cover - inside)


def run(name: str, steps: int, log_every: int, step: Callable[[int], float]) -> None:
    """Call `step` `steps` times, printing the mean loss and the pace every `log_every` steps."""
    losses: list[float] = []
    start = last = time.perf_counter()
    for i in range(1, steps + 1):
        losses.append(step(i))
        if i % log_every == 0 or i == steps:
            now = time.perf_counter()
            pace = (log_every if i % log_every == 0 else i % log_every) / (now - last)
            print(f"{name} step {i}/{steps}  loss {np.mean(losses):.5f}  {pace:.2f} steps/s  "
                  f"{now - start:.0f} s", flush=True)
            losses, last = [], now


def train_vae(config: dict[str, Any], device: torch.device) -> AutoencoderKL:
    """Stage 1: an AutoencoderKL that reconstructs scenes: MSE weighted towards the shape, plus a
    small KL term (a plain mean rounded small squares into circles and let L1 lose their colour)."""
    settings = config["training"]["vae"]
    torch.manual_seed(config["seed"])
    rng = np.random.default_rng(config["seed"])
    vae = AutoencoderKL(**config["vae"]).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings["learning_rate"])
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=settings["warmup_steps"],
                             num_training_steps=settings["steps"])

    def step(_: int) -> float:
        pixels, mask, _captions = batch(rng, settings["batch_size"], device)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        weight = 1 + (settings["foreground_weight"] - 1) * mask
        loss = weighted_mse(reconstruction, pixels, weight) \
            + settings["kl_weight"] * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        return loss.item()

    vae.train()
    run("vae", settings["steps"], config["log_every"], step)
    vae.eval().requires_grad_(False)
    # Stable Diffusion's convention: latents times scaling_factor have unit variance.
    with torch.no_grad():
        pixels, _mask, _captions = batch(rng, 256, device)
        latents = vae.encode(pixels).latent_dist.sample()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


def text_encoder_for(config: dict[str, Any], tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config["text_encoder"],
    ))


def unet_for(config: dict[str, Any]) -> UNet2DConditionModel:
    """The UNet, its input and output channels the VAE's latent channels: one setting, not two to keep equal."""
    channels = config["vae"]["latent_channels"]
    return UNet2DConditionModel(**config["unet"], in_channels=channels, out_channels=channels)


def token_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """The captions as the text encoder takes them: padded to the tokenizer's full length, as the pipelines pad."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def draw_timesteps(step: int, size: int, settings: dict[str, Any], count: int) -> torch.Tensor:
    """Stage 2's timesteps at `step`. The noisiest steps, where the input holds no trace of the
    shape, are the only ones that teach the model to place it from the words. So the first
    `noisiest_first` steps train t = count − 1 alone, a plain regression from caption to mean
    picture (there the UNet began to hear the position after 500–1,000 steps; in the mix, not
    within 1,000: docs/toy-model.md). Then the noisiest `later_portion` is drawn `later_multiplier`
    times as often as the rest (the "later" bias of diffusers' train_text_to_image_sdxl.py)."""
    if step <= settings["noisiest_first"]:
        return torch.full((size,), count - 1)
    weights = torch.ones(count)
    weights[count - int(count * settings["later_portion"]):] *= settings["later_multiplier"]
    return torch.multinomial(weights, size, replacement=True)


def draw_middle_timesteps(size: int, settings: dict[str, Any], stage_two: dict[str, Any], count: int) -> torch.Tensor:
    """Stage 3's timesteps: `middle_share` of them uniform over `middle`, the noise levels where a
    square's corners are decided (img2img kept them from strength 0.3, lost them from 0.5); the rest
    drawn as stage 2's second phase draws them, so the place and colours learnt there hold (a
    fine-tune on the middle alone lost a third of the positions: docs/toy-model.md, run 10)."""
    low, high = settings["middle"]
    middle = torch.randint(low, high + 1, (size,))
    rest = draw_timesteps(stage_two["noisiest_first"] + 1, size, stage_two, count)
    return torch.where(torch.rand(size) < settings["middle_share"], middle, rest)


Snapshot = Callable[[int, UNet2DConditionModel, CLIPTextModel], None]
Timesteps = Callable[[int, int], torch.Tensor]  # (step, batch size) → timesteps


def fit_denoiser(name: str, settings: dict[str, Any], seed: int, vae: AutoencoderKL, unet: UNet2DConditionModel,
                 text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, timesteps: Timesteps,
                 snapshot: Snapshot | None = None) -> None:
    """Train the UNet and the text encoder together on `settings`' steps, predicting
    v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho 2022), and leave the EMA weights in them.

    `snapshot` gets the EMA weights every `snapshot_every` steps and at the end, so a long CPU run
    can be judged (evaluate.py) before it ends."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = unet.device
    noise_scheduler = DDPMScheduler(**SCHEDULE)
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=settings["learning_rate"])
    schedule = get_scheduler(settings["lr_schedule"], optimizer, num_warmup_steps=settings["warmup_steps"],
                             num_training_steps=settings["steps"])
    ema = EMAModel(parameters, decay=settings["ema_decay"])
    scaling = vae.config.scaling_factor

    def step(i: int) -> float:
        pixels, mask, captions = batch(rng, settings["batch_size"], device)
        captions = ["" if rng.random() < settings["caption_dropout"] else c for c in captions]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * scaling
        noise = torch.randn_like(latents)
        t = timesteps(i, len(captions)).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        ids = token_ids(tokenizer, captions).to(device)
        prediction = unet(noisy, t, text_encoder(ids)[0]).sample
        weight = latent_weight(mask, pixels.shape[-1] // latents.shape[-1], settings["foreground_weight"],
                               settings["outline_weight"])
        loss = weighted_mse(prediction, noise_scheduler.get_velocity(latents, noise, t), weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        ema.step(parameters)
        if snapshot is not None and i % settings["snapshot_every"] == 0 and i < settings["steps"]:
            ema.store(parameters)
            ema.copy_to(parameters)
            snapshot(i, unet, text_encoder)
            ema.restore(parameters)
        return loss.item()

    unet.train()
    text_encoder.train()
    run(name, settings["steps"], settings["log_every"], step)
    ema.copy_to(parameters)
    unet.eval()
    text_encoder.eval()
    if snapshot is not None:
        snapshot(settings["steps"], unet, text_encoder)


def train_denoiser(config: dict[str, Any], vae: AutoencoderKL, tokenizer: CLIPTokenizer,
                   device: torch.device, snapshot: Snapshot | None = None) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Stage 2: a new UNet and text encoder learn the scenes from their captions."""
    settings = {**config["training"]["unet"], "log_every": config["log_every"]}
    unet = unet_for(config).to(device)
    text_encoder = text_encoder_for(config, tokenizer).to(device)
    fit_denoiser("unet", settings, config["seed"] + 1, vae, unet, text_encoder, tokenizer,
                 lambda step, size: draw_timesteps(step, size, settings, TIMESTEPS), snapshot)
    return unet, text_encoder


def train_shape(config: dict[str, Any], vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                tokenizer: CLIPTokenizer) -> None:
    """Stage 3: stage 2's weights, a fresh optimizer and EMA, the middle noise levels and the outline
    weighted: there a square and a circle differ, and stage 2 drew both as one rounded blob."""
    settings = {**config["training"]["shape"], "log_every": config["log_every"]}
    stage_two = config["training"]["unet"]
    fit_denoiser("shape", settings, config["seed"] + 2, vae, unet, text_encoder, tokenizer,
                 lambda _step, size: draw_middle_timesteps(size, settings, stage_two, TIMESTEPS))


def write(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
          out: Path, guidance: float) -> None:
    """The diffusers folder, written beside `out` and renamed into place, with the guidance a request
    that names none gets (daemon/models/facts.py)."""
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        # DDIM with trailing timesteps, so sampling starts at t = 999 where training put zero SNR (Lin et al. §3.3).
        scheduler=DDIMScheduler(**SCHEDULE, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    staging = out.with_name(out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    # transformers 5 saves tokenizer.json alone; our engine's tokenizer and Apple's Swift one read these two.
    shutil.copy(TOKENIZER / "vocab.json", staging / "tokenizer")
    shutil.copy(TOKENIZER / "merges.txt", staging / "tokenizer")
    (staging / FACTS_FILE).write_text(json.dumps({"default_guidance_scale": guidance}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB)", flush=True)


def train(config: dict[str, Any], out: Path, device: torch.device, vae_folder: Path | None = None,
          denoiser_folder: Path | None = None) -> None:
    """The three stages, then the folder. `vae_folder` skips stage 1; `denoiser_folder` (a stage 2
    result: its VAE, UNet and text encoder) skips stages 1 and 2. Stage 2 leaves a folder
    `OUT.step-N` beside `out` every `snapshot_every` steps and at its end, which is what
    `denoiser_folder` takes."""
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    guidance = config["default_guidance_scale"]
    vae_source = vae_folder if denoiser_folder is None else denoiser_folder / "vae"
    vae = train_vae(config, device) if vae_source is None else AutoencoderKL.from_pretrained(vae_source)
    vae = vae.to(device).eval().requires_grad_(False)
    if denoiser_folder is None:

        def snapshot(step: int, unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> None:
            write(vae, unet, text_encoder, tokenizer, out.with_name(f"{out.name}.step-{step}"), guidance)

        unet, text_encoder = train_denoiser(config, vae, tokenizer, device, snapshot)
    else:
        unet = UNet2DConditionModel.from_pretrained(denoiser_folder / "unet").to(device)
        text_encoder = CLIPTextModel.from_pretrained(denoiser_folder / "text_encoder").to(device)
    train_shape(config, vae, unet, text_encoder, tokenizer)
    write(vae.to("cpu"), unet.to("cpu"), text_encoder.to("cpu"), tokenizer, out, guidance)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--vae", type=Path, help="a trained VAE folder: skip stage 1")
    parser.add_argument("--denoiser", type=Path, help="a stage 2 result (OUT.step-N): skip stages 1 and 2")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"training on {device} with {torch.get_num_threads()} threads", flush=True)
    train(load_config(args.config), args.out, device, args.vae, args.denoiser)


if __name__ == "__main__":
    main()
