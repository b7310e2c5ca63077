"""The PyTorch runtime: a diffusers-format folder on CUDA, MPS or the CPU. Load, predict, nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel


def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class TorchRuntime:
    def __init__(self, folder: Path, device: str = "auto", with_safety_checker: bool = False) -> None:
        self.device = pick_device(device)
        # Half precision where the hardware computes it fast; the CPU stays in float32.
        self.dtype = torch.float32 if self.device.type == "cpu" else torch.float16
        load = {"torch_dtype": self.dtype}
        self.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **load).to(self.device).eval()
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet", **load).to(self.device).eval()
        self.vae = AutoencoderKL.from_pretrained(folder / "vae", **load).to(self.device).eval()
        self.safety_checker = None
        if with_safety_checker:
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

            self.safety_checker = (
                StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker", **load).to(self.device).eval()
            )

    def _in(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, self.dtype)

    @staticmethod
    def _out(tensor: torch.Tensor) -> np.ndarray:
        return tensor.float().cpu().numpy()

    @torch.inference_mode()
    def encode_text(self, input_ids: np.ndarray) -> np.ndarray:
        return self._out(self.text_encoder(torch.from_numpy(input_ids).to(self.device))[0])

    @torch.inference_mode()
    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, hidden_states: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.asarray(timestep)).to(self.device)
        return self._out(self.unet(self._in(sample), t, encoder_hidden_states=self._in(hidden_states)).sample)

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self._out(self.vae.decode(self._in(latents)).sample)

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> np.ndarray:
        return self._out(self.vae.encode(self._in(images)).latent_dist.parameters)

    @torch.inference_mode()
    def check_safety(self, clip_input: np.ndarray, images: np.ndarray) -> np.ndarray:
        _, flagged = self.safety_checker(clip_input=self._in(clip_input), images=images.copy())
        return np.asarray(flagged, dtype=bool)
