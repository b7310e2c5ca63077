"""Tiny random-weight SDXL base and refiner as diffusers folders, built by the tests that need them
(test_sdxl against diffusers' pipelines, test_coreml through the converter).

The shapes are diffusers' own SDXL tests' (huggingface/diffusers
tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py and test_stable_diffusion_xl_img2img.py,
get_dummy_components): UNet block_out_channels (32, 64), addition_embed_type "text_time",
addition_time_embed_dim 8, transformer_layers_per_block (1, 2), two CLIP text encoders of width 32
with projection_dim 32; the refiner without the first encoder, requires_aesthetics_score and 5 size
ids. The vocabulary is the shipped tiny model's; the second tokenizer pads with "!" as SDXL's
tokenizer_2 does (stabilityai/stable-diffusion-xl-base-1.0). Fixed seeds: every build of a kind
has the same weights, so a base and a refiner built apart share their VAE and second encoder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffusiond.daemon.models.catalog import TINY


def _unet(refiner: bool) -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=72 if refiner else 80,  # 5 or 6 size ids × 8 + the pooled 32
        cross_attention_dim=32 if refiner else 64,  # the second encoder alone, or both side by side
    )
    # As the shipped tiny model (tests/build_tiny_model.py): an untrained UNet amplifies float32
    # rounding step by step; a tenth of its output layer keeps the images comparable to the pixel.
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    return unet


def build(folder: Path, refiner: bool = False) -> Path:
    """A tiny SDXL base (or refiner) saved as a diffusers folder at `folder`."""
    tokenizer = CLIPTokenizer.from_pretrained(TINY / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(TINY / "tokenizer", pad_token="!")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=128,
        scaling_factor=0.13025,  # SDXL's VAE's
    )
    torch.manual_seed(0)
    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
        vocab_size=len(tokenizer), hidden_act="gelu", projection_dim=32,
    )
    text_encoder = CLIPTextModel(config)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    # SDXL's own scheduler config (stabilityai/stable-diffusion-xl-base-1.0, scheduler_config.json).
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    if refiner:
        pipeline = StableDiffusionXLImg2ImgPipeline(
            unet=_unet(refiner), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2, scheduler=scheduler, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False, add_watermarker=False,
        )
    else:
        pipeline = StableDiffusionXLPipeline(
            unet=_unet(refiner), vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler, add_watermarker=False,
        )
    pipeline.save_pretrained(folder, safe_serialization=True)
    for tokenizer_dir in folder.glob("tokenizer*"):  # transformers 5 saves tokenizer.json only; the Hub's have both
        for file in ("vocab.json", "merges.txt"):
            shutil.copyfile(TINY / "tokenizer" / file, tokenizer_dir / file)
    return folder
