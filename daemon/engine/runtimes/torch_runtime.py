"""The PyTorch runtime: a diffusers-format folder on CUDA, MPS or the CPU.

On CUDA it keeps what a warm daemon can afford (docs/gpu.md): half precision, channels_last, the
UNet and VAE decoder compiled once per shape, and the whole denoising loop on the device — the
scheduler as a coefficient table traced by the pipeline (daemon/engine/linear_steps.py), guidance in the
same batch, each step one CUDA graph replay — with no host sync inside the loop.

LoRAs go on and off the warm modules through diffusers' own LoRA loading (PEFT adapters on the
UNet and text encoders, :meth:`TorchRuntime.set_loras`); the base weights are never touched, so
taking every adapter off gives the base model back exactly, without a reload.

SDXL folders load their second text encoder (CLIPTextModelWithProjection) beside or, for the
refiner, instead of the first; the UNet then takes the pooled text projection and the size
conditioning as `added_cond_kwargs`, as diffusers' StableDiffusionXLPipeline calls it.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ...config import TORCH_SETTINGS, check_choice
from ...errors import ModelInvalid
from ...models.lora import load_adapter, lora_host
from ..linear_steps import LinearPlan
from . import BeforeStep, Conditioning, StepCallback, TextEncoding

if TYPE_CHECKING:
    from ...config import Config
    from ...models.lora import LoraFile

log = logging.getLogger("diffusiond.torch")
_Network = TypeVar("_Network")
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MAX_LOOPS = 4  # captured loops (one per latent shape and step bucket) kept; each holds a graph's memory


def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class TorchSettings:
    """How the runtime uses its device. "auto" is on for CUDA and off elsewhere, so the CPU (and
    the test suite) runs exactly as before; precision "auto" is fp16 on a GPU, fp32 on the CPU."""

    precision: str = "auto"  # auto | fp16 | bf16 | fp32
    compile: str = "auto"  # torch.compile (inductor) of the UNet and the VAE decoder
    cuda_graphs: str = "auto"  # each denoising step one graph replay (CUDA only)
    channels_last: str = "auto"  # NHWC weights and activations: the fast layout for tensor-core convs
    device_loop: str = "auto"  # the denoising loop on the device (needs a linear scheduler)
    compile_cache: Path | None = None  # inductor's on-disk cache, so a restart skips most compiling

    def __post_init__(self) -> None:
        for name, allowed in TORCH_SETTINGS.items():
            check_choice(name, getattr(self, name), allowed)

    @classmethod
    def from_config(cls, config: Config) -> TorchSettings:
        """The settings a daemon Config states (docs/gpu.md)."""
        return cls(**{name: getattr(config, name) for name in TORCH_SETTINGS}, compile_cache=config.state_dir / "compiled")

    def on(self, name: str, device: torch.device) -> bool:
        value = getattr(self, name)
        if name == "cuda_graphs" and device.type != "cuda":
            return False
        return value == "on" or value == "auto" and device.type == "cuda"

    def dtype(self, device: torch.device) -> torch.dtype:
        if self.precision == "auto":
            return torch.float32 if device.type == "cpu" else torch.float16
        return PRECISIONS[self.precision]


def _quiet_loading() -> bool:
    """Silence diffusers' and transformers' per-load chatter (a weights bar, an `accelerate`
    advertisement for each network); whether accelerate's low-memory loading is there to use."""
    import diffusers.utils.logging
    import transformers.utils.logging
    from diffusers.utils import is_accelerate_available

    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    return is_accelerate_available()


_LOW_MEMORY = _quiet_loading()
if not _LOW_MEMORY:
    log.info("accelerate is not installed: each model load briefly holds its weights twice in memory")


def _variant(folder: Path) -> str | None:
    """"fp16" when the folder holds only fp16-variant weights (what models/store.py fetches for a
    GPU when the repo has them): from_pretrained finds those only when asked for the variant."""
    weights = [p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin")]
    return "fp16" if weights and all(".fp16." in name for name in weights) else None


def _load(kind: type[_Network], folder: Path, **options: object) -> _Network:
    """One network from its folder; a file that is missing, truncated or not weights is the
    model's fault (model_invalid, naming the file), not the output's or a bug's."""
    try:
        return kind.from_pretrained(  # type: ignore[attr-defined,no-any-return]
            folder, low_cpu_mem_usage=_LOW_MEMORY, variant=_variant(folder), **options
        )
    except (OSError, ValueError, RuntimeError) as exc:
        weights = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin"))
        where = weights[0] if len(weights) == 1 else folder
        reason = str(exc).strip().splitlines()[0].rstrip(". ") if str(exc).strip() else type(exc).__name__
        raise ModelInvalid(
            f"cannot load the weights in {where}: the file may be truncated or damaged; download or copy the "
            f"model again ({reason})"
        ) from None


class TorchRuntime:
    def __init__(
        self,
        folder: Path,
        device: str = "auto",
        with_safety_checker: bool = False,
        settings: TorchSettings = TorchSettings(),
    ) -> None:
        self.device = pick_device(device)
        self.settings = settings
        self.dtype = settings.dtype(self.device)
        # SD: text_encoder; SDXL: text_encoder and text_encoder_2; the SDXL refiner: text_encoder_2.
        self.text_encoders: list[CLIPTextModel | CLIPTextModelWithProjection] = [
            _load(kind, folder / part, torch_dtype=self.dtype).to(self.device).eval()
            for part, kind in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection))
            if (folder / part / "config.json").is_file()
        ]
        self.sdxl = (folder / "text_encoder_2" / "config.json").is_file()
        self.unet = _load(UNet2DConditionModel, folder / "unet", torch_dtype=self.dtype).to(self.device).eval()
        # SDXL's VAE overflows in float16: diffusers' SDXL pipelines run it in float32 when its config says force_upcast.
        vae_config = AutoencoderKL.load_config(folder / "vae")
        upcast = self.sdxl and self.dtype == torch.float16 and bool(vae_config.get("force_upcast", True))
        self.vae_dtype = torch.float32 if upcast else self.dtype
        self.vae = _load(AutoencoderKL, folder / "vae", torch_dtype=self.vae_dtype).to(self.device).eval()
        self.safety_checker = None
        if with_safety_checker:
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

            self.safety_checker = _load(StableDiffusionSafetyChecker, folder / "safety_checker", torch_dtype=self.dtype)
            self.safety_checker = self.safety_checker.to(self.device).eval()
        self.memory_format = torch.contiguous_format
        if settings.on("channels_last", self.device):
            self.memory_format = torch.channels_last
            self.unet.to(memory_format=self.memory_format)
            self.vae.to(memory_format=self.memory_format)
        self.compiles = settings.on("compile", self.device)
        self.graphs = settings.on("cuda_graphs", self.device)
        self.device_loop = settings.on("device_loop", self.device)
        self._unet: Callable[..., Any] = self.unet
        self._decode: Callable[[torch.Tensor], Any] = self.vae.decode
        if self.compiles:
            if settings.compile_cache is not None:
                os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.compile_cache))
            # Shapes are static per job; a new size compiles its own graph rather than a dynamic one.
            self._unet = torch.compile(self.unet, fullgraph=True, dynamic=False)
            self._decode = torch.compile(self.vae.decode, fullgraph=True, dynamic=False)
        self._loops: OrderedDict[tuple, _Loop] = OrderedDict()
        self._lora_host: Any = None
        self._adapters: list[str] = []  # loaded LoRA adapters, by name

    def _in(self, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device, dtype or self.dtype)
        return tensor.contiguous(memory_format=self.memory_format) if tensor.ndim == 4 else tensor

    def _out(self, tensor: torch.Tensor) -> np.ndarray:
        """To the host; on CUDA through pinned memory, one copy and one sync."""
        tensor = tensor.float()
        if self.device.type != "cuda":
            return tensor.cpu().numpy()
        host = torch.empty(tensor.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host.numpy()

    @torch.inference_mode()
    def encode_text(self, input_ids: Sequence[np.ndarray]) -> TextEncoding:
        """SD: the last hidden states. SDXL (diffusers' encode_prompt, clip_skip None): each encoder's
        penultimate hidden states, side by side, and the last encoder's pooled projection."""
        if len(input_ids) != len(self.text_encoders):
            raise ValueError(f"{len(input_ids)} id arrays for {len(self.text_encoders)} text encoders")
        if not self.sdxl:
            (ids,), (encoder,) = input_ids, self.text_encoders
            return TextEncoding(self._out(encoder(torch.from_numpy(ids).to(self.device))[0]))
        hidden, pooled = [], None
        for ids, encoder in zip(input_ids, self.text_encoders):
            output = encoder(torch.from_numpy(ids).to(self.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # CLIPTextModelWithProjection's text_embeds, the last encoder's
        assert pooled is not None
        return TextEncoding(self._out(torch.cat(hidden, dim=-1)), self._out(pooled))

    def _added(self, conditioning: Conditioning) -> dict[str, Any]:
        """The UNet's keyword arguments beside sample and timestep: SDXL's added_cond_kwargs too."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self._in(conditioning.hidden)}
        if conditioning.text_embeds is not None and conditioning.time_ids is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self._in(conditioning.text_embeds),
                                           "time_ids": self._in(conditioning.time_ids)}
        return kwargs

    @torch.inference_mode()
    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, conditioning: Conditioning) -> np.ndarray:
        t = torch.from_numpy(np.asarray(timestep)).to(self.device)
        return self._out(self._unet(self._in(sample), t, **self._added(conditioning)).sample)

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self._out(self._decode(self._in(latents, self.vae_dtype)).sample)

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> np.ndarray:
        return self._out(self.vae.encode(self._in(images, self.vae_dtype)).latent_dist.parameters)

    @torch.inference_mode()
    def check_safety(self, clip_input: np.ndarray, images: np.ndarray) -> np.ndarray:
        if self.safety_checker is None:
            raise ModelInvalid("this runtime was opened without the safety checker; open it with_safety_checker=True")
        _, flagged = self.safety_checker(clip_input=self._in(clip_input), images=images.copy())
        return np.asarray(flagged, dtype=bool)

    @torch.inference_mode()
    def denoise(self, latents: np.ndarray, conditioning: Conditioning, plan: LinearPlan, guidance: float | None,
                before_step: BeforeStep, on_step: StepCallback | None) -> np.ndarray:
        """The whole denoising loop on the device: step k's UNet input is ``plan.inputs[k] @ atoms``,
        its guided output becomes atom k + 1. ``before_step(k)`` runs before step k is queued (it
        raises to cancel); ``on_step`` gets step k's latents while step k + 1 runs, so the device
        never waits for the host."""
        loop = self._loop(latents.shape, _shapes(conditioning), plan.steps, guidance is not None)
        return loop.run(latents, conditioning, plan, guidance, before_step, on_step)

    def _lora_pipeline(self) -> Any:
        if self._lora_host is None:
            self._lora_host = lora_host(self.unet, self.text_encoders, self.sdxl)
        return self._lora_host

    def set_loras(self, loras: Sequence[tuple[LoraFile, float]]) -> None:
        """Each LoRA an unfused PEFT adapter named by its hash, weighted by set_adapters; adapters of
        the last set that this one lacks are deleted, all of them unloaded when it is empty (the
        modules are then the base's again). Captured loops are dropped: they hold the old modules."""
        host = self._lora_pipeline()
        wanted = {f"lora_{file.hash}": (file, float(weight)) for file, weight in loras}
        self._loops.clear()
        try:
            if not wanted:
                if self._adapters:
                    host.unload_lora_weights()
                self._adapters = []
                return
            stale = [name for name in self._adapters if name not in wanted]
            if stale:
                host.delete_adapters(stale)
                for encoder in self.text_encoders:  # diffusers leaves a transformers model's config entry
                    for name in stale:
                        getattr(encoder, "peft_config", {}).pop(name, None)
                self._adapters = [name for name in self._adapters if name in wanted]
            for name, (file, _) in wanted.items():
                if name not in self._adapters:
                    load_adapter(host, name, file)
                    self._adapters.append(name)
            host.set_adapters(list(wanted), [weight for _, weight in wanted.values()])
        except BaseException:
            if self._adapters or wanted:
                host.unload_lora_weights()
            self._adapters = []
            raise

    @property
    def has_warm_up(self) -> bool:
        """Whether warm_up has work to do (compiling or capturing), worth a loading phase of its own."""
        return self.compiles or self.graphs

    def warm_up(self, width: int, height: int, count: int = 1, steps: int = 25) -> float:
        """Compile and capture for one request shape (guided), as a loading phase; the seconds it took.
        Other shapes compile at their first job."""
        started = time.perf_counter()
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (count, self.unet.config.in_channels, height // factor, width // factor)
        conditioning = Conditioning(np.zeros((2 * count, 77, self.unet.config.cross_attention_dim), dtype=np.float32))
        if self.sdxl:
            # The pooled projection's width and the number of size ids, from the UNet's added embedding.
            pooled = self.text_encoders[-1].config.projection_dim
            ids = (self.unet.config.projection_class_embeddings_input_dim - pooled) // self.unet.config.addition_time_embed_dim
            conditioning = Conditioning(conditioning.hidden, np.zeros((2 * count, pooled), np.float32),
                                        np.full((2 * count, ids), float(height), np.float32))
        latents = np.zeros(shape, dtype=np.float32)
        if self.device_loop:
            n = steps
            plan = LinearPlan(
                np.full(n, 999.0), np.zeros((n, n + 1), np.float32), np.zeros((n + 1, n + 1), np.float32)
            )
            latents = self.denoise(latents, conditioning, plan, 7.5, lambda k: None, None)
        else:
            self.predict_noise(np.concatenate([latents, latents]), np.asarray(999), conditioning)
        self.decode(latents)
        return time.perf_counter() - started

    def _loop(self, shape: tuple[int, ...], conditioning: _Shapes, steps: int, guided: bool) -> _Loop:
        # Step counts share a loop up to a power of two, so 20 and 25 steps reuse one graph.
        capacity = max(16, 1 << steps.bit_length())
        key = (shape, conditioning, capacity, guided)
        if key in self._loops:
            self._loops.move_to_end(key)
            return self._loops[key]
        while len(self._loops) >= MAX_LOOPS:
            self._loops.popitem(last=False)
        self._loops[key] = _Loop(self, shape, conditioning, capacity, guided)
        return self._loops[key]


# The shapes of a Conditioning's arrays (hidden, text_embeds, time_ids; None where it has none).
_Shapes = tuple[tuple[int, ...] | None, ...]


def _shapes(conditioning: Conditioning) -> _Shapes:
    return tuple(None if a is None else a.shape for a in (conditioning.hidden, conditioning.text_embeds, conditioning.time_ids))


class _Loop:
    """Static buffers (and, on CUDA, a captured graph) for one latent shape, conditioning shapes and step capacity."""

    def __init__(
        self, runtime: TorchRuntime, shape: tuple[int, ...], conditioning: _Shapes, capacity: int, guided: bool
    ) -> None:
        self.runtime, self.capacity, self.guided = runtime, capacity, guided
        device, dtype = runtime.device, runtime.dtype
        self.atoms = torch.zeros((capacity, *shape), dtype=torch.float32, device=device)
        self.row = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.timestep = torch.zeros((), dtype=torch.float32, device=device)
        self.scale = torch.zeros((), dtype=torch.float32, device=device)
        # encoder_hidden_states, and SDXL's text_embeds and time_ids: one static buffer each.
        self.conditioning = [None if s is None else torch.zeros(s, dtype=dtype, device=device) for s in conditioning]
        self.output = torch.zeros(shape, dtype=torch.float32, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if runtime.graphs:
            self.graph = self._capture()

    def _step(self) -> None:
        """One step from the static buffers into ``output``: combine, UNet, guidance."""
        runtime = self.runtime
        sample = torch.tensordot(self.row, self.atoms, dims=1).to(runtime.dtype)
        if self.guided:
            sample = torch.cat([sample, sample])
        sample = sample.contiguous(memory_format=runtime.memory_format)
        hidden, text_embeds, time_ids = self.conditioning
        kwargs: dict[str, Any] = {"encoder_hidden_states": hidden}
        if text_embeds is not None and time_ids is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        prediction = runtime._unet(sample, self.timestep, **kwargs).sample.float()
        if self.guided:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + self.scale * (cond - uncond)
        self.output.copy_(prediction)

    def _capture(self) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # compile and let the allocator and cuDNN settle before capture
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        return graph

    def run(self, latents: np.ndarray, conditioning: Conditioning, plan: LinearPlan, guidance: float | None,
            before_step: BeforeStep, on_step: StepCallback | None) -> np.ndarray:
        runtime, n = self.runtime, plan.steps
        device = runtime.device
        cuda = device.type == "cuda"
        inputs = torch.zeros((n, self.capacity), dtype=torch.float32)
        inputs[:, : n + 1] = torch.from_numpy(plan.inputs)
        rows = torch.zeros((n + 1, self.capacity), dtype=torch.float32)
        rows[:, : n + 1] = torch.from_numpy(plan.latents)
        timesteps = torch.from_numpy(plan.timesteps.astype(np.float32))
        inputs, rows, timesteps = (t.to(device, non_blocking=cuda) for t in (inputs, rows, timesteps))
        self.atoms.zero_()
        self.atoms[0].copy_(torch.from_numpy(latents))
        for buffer, array in zip(self.conditioning, (conditioning.hidden, conditioning.text_embeds, conditioning.time_ids)):
            if buffer is not None and array is not None:
                buffer.copy_(torch.from_numpy(array))
        self.scale.fill_(guidance or 0.0)
        pending: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None
        for k in range(n):
            before_step(k)
            self.row.copy_(inputs[k])
            self.timestep.copy_(timesteps[k])
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            self.atoms[k + 1].copy_(self.output)
            if on_step is not None:
                if pending is not None:
                    self._report(pending, n, on_step)
                pending = self._fetch(k + 1, rows[k + 1], cuda)
        if on_step is not None and pending is not None:
            self._report(pending, n, on_step)
        return runtime._out(torch.tensordot(rows[n], self.atoms, dims=1))

    def _fetch(self, step: int, row: torch.Tensor, cuda: bool) -> tuple[int, torch.Tensor, torch.cuda.Event | None]:
        """Queue the copy of step's latents to the host without waiting for it."""
        latents = torch.tensordot(row, self.atoms, dims=1)
        if not cuda:
            return step, latents.clone(), None
        host = torch.empty(latents.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(latents, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return step, host, done

    @staticmethod
    def _report(pending: tuple[int, torch.Tensor, torch.cuda.Event | None], total: int, on_step: StepCallback) -> None:
        step, host, done = pending
        if done is not None:
            done.synchronize()
        on_step(step, total, host.numpy())
