"""The torch runtime on a GPU, side by side in one run: diffusers, the compile recipe, ours.

On CUDA it builds an SD 1.5-shaped model with random weights from config (no download; 512×512,
UNet 320-640-1280-1280, CLIP ViT-L-sized text encoder) and measures, on the one GPU, at the same
settings (fp16, 25 steps DPM++ 2M, guidance 7.5, count 1):

    diffusers eager      StableDiffusionPipeline as it comes (SDPA)
    diffusers recipe     + channels_last, torch.compile(unet, mode="reduce-overhead",
                         fullgraph=True) (CUDA graphs), compiled VAE decode
    ours eager           our Pipeline, TorchRuntime with every lever off (the host loop)
    ours loop            + the denoising loop on the device (no compile, no graphs)
    ours loop+graphs     + each step one CUDA graph replay, channels_last (no compile)
    ours optimised       every lever on: what the daemon runs on CUDA by default
    ours optimised, restart    the same again in a fresh compiler state: compile seconds from
                         inductor's on-disk cache, as after a daemon restart
    ours compiled, no graphs   optimised but without CUDA graphs (what the graphs add; a fallback)
    ours fp8 (trial)     the daemon's defaults (optimised on CUDA, eager on the CPU) with the
                         transformer blocks' Linears as float8 matmuls (torch._scaled_mm)
    ours optimised bf16  the same as optimised in bfloat16
    ours tuned           optimised + fused q/k/v projections + inductor's conv-as-matmul and
                         coordinate-descent tuning (a trial: not a daemon setting until it pays)

Columns: seconds per image (median), UNet ms per step at batch 2 (ours with the device loop: one
whole loop step, UNet + guidance + scheduler, from a timed loop), VAE decode ms, compile seconds
(the loading phase), the fraction of the FLOP floor reached (FLOPs of one UNet step counted with
FlopCounterMode, over the rate of a large fp16 matmul measured in this run, and over the card's
datasheet peak), speed against diffusers eager, and the largest pixel difference (of 255) from
the eager image of the variant's family (ours eager: from diffusers eager), from the same latents.

On the CPU it runs the shipped tiny model at 128×128 so the script can be run anywhere quickly.
Each variant is guarded: one that fails prints its error and the run goes on; once ``--budget``
seconds are spent the rest are skipped. Results are printed and, with ``--out``, written as
gpu.json and gpu.md after every variant, so a run cut short still leaves what it measured.

    python bench/gpu.py [--out DIR] [--budget 420] [--repeats 5]

The device command (docs/gpu.md explains the wheels):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
    mkdir -p /tmp/ns/diffusiond && ln -sfn $PWD/daemon /tmp/ns/diffusiond/daemon && \
    ln -sfn $PWD/clients /tmp/ns/diffusiond/clients && export PYTHONPATH=/tmp/ns:$PYTHONPATH && \
    PYTHONUNBUFFERED=1 python3 bench/gpu.py --out $OUT --budget 420 2>&1 | tee $OUT/log
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch._inductor.config
from torch.utils.flop_counter import FlopCounterMode

from diffusiond.daemon.engine import schedulers
from diffusiond.daemon.engine.noise import noise_source
from diffusiond.daemon.engine.pipeline import Pipeline, Request
from diffusiond.daemon.engine.runtimes import Conditioning
from diffusiond.daemon.engine.runtimes.torch_runtime import TorchRuntime, TorchSettings
from diffusiond.daemon.models.catalog import TINY
from diffusiond.daemon.models.diffusers_folder import ModelFolder

PROMPT = "a lighthouse at dusk, oil painting"
SEED = 1
# Dense fp16/bf16 tensor-core peaks from the datasheets (TFLOP/s, no sparsity), by device name.
# The inductor settings diffusers' SDXL speed-up guide uses, for the "ours tuned" trial.
TUNING = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False,
          "coordinate_descent_check_all_directions": True}
DATASHEET = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}


@dataclass
class Row:
    name: str
    seconds: float | None = None  # per image
    unet_ms: float | None = None  # per step, batch 2
    vae_ms: float | None = None
    compile_s: float | None = None
    pixel_diff: int | None = None  # max |Δ| of 255 against the family's eager image
    note: str = ""
    image: np.ndarray | None = field(default=None, repr=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def build_sd15(folder: Path, device: torch.device) -> Path:
    """An SD 1.5-shaped pipeline with random weights (fp16), saved as a diffusers folder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(TINY / "tokenizer")
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = diffusers.AutoencoderKL(
            sample_size=512, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, latent_channels=4,
        )
    with torch.no_grad():  # as the tiny model: keep an untrained UNet from amplifying rounding
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    scheduler = diffusers.PNDMScheduler.from_pretrained(TINY / "scheduler")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    del pipe, unet, vae, text_encoder
    gc.collect()
    return folder


def unet_flops(unet: torch.nn.Module, latents: torch.Tensor, embeds: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        unet(torch.cat([latents, latents]), torch.tensor(999.0, device=latents.device), encoder_hidden_states=embeds)
    return counter.get_total_flops()


def matmul_rate(device: torch.device) -> float:
    """FLOP/s of a large matmul in this run: the achievable peak the floor is set against."""
    n, dtype = (8192, torch.float16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n**3 / median_time(lambda: a @ b, device, 10)


class Fp8Linear(torch.nn.Module):
    """A Linear through float8 e4m3 tensor-core matmuls (Hopper): the weight scaled once, the
    activation per call, both per tensor. A trial lever: only the bench uses it."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.weight_scale = weight.abs().amax().clamp(min=1e-12) / 448.0
        self.weight = (weight / self.weight_scale).to(torch.float8_e4m3fn)
        self.bias = linear.bias
        self.out_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        scale = flat.abs().amax().float().clamp(min=1e-12) / 448.0
        out = torch._scaled_mm((flat / scale).to(torch.float8_e4m3fn), self.weight.t(), scale_a=scale,
                               scale_b=self.weight_scale, bias=self.bias, out_dtype=self.out_dtype)
        return out.reshape(*x.shape[:-1], -1)


def fp8_transformer_linears(unet: torch.nn.Module) -> int:
    """Swap the Linears of the UNet's transformer blocks (attention and feed-forward) for Fp8Linear."""
    swapped = 0
    for block in [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                    setattr(parent, name, Fp8Linear(child))
                    swapped += 1
    return swapped


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.started = time.perf_counter()
        if self.cuda:
            self.folder = build_sd15(Path(tempfile.mkdtemp(prefix="sd15-random-")), self.device)
            self.card = torch.cuda.get_device_name()
        else:
            self.folder = TINY
            self.card = f"CPU, {torch.get_num_threads()} threads"
        self.model = ModelFolder.open(str(self.folder))
        self.size = args.size or (512 if self.cuda else 128)
        self.dtype = torch.float16 if self.cuda else torch.float32
        factor = self.model.vae_scale_factor
        self.latent_shape = (1, self.model.latent_channels, self.size // factor, self.size // factor)
        self.latents = noise_source("numpy", SEED)(self.latent_shape)  # what our pipeline draws for SEED
        self.request = Request(PROMPT, steps=args.steps, guidance_scale=7.5, width=self.size, height=self.size,
                               seed=SEED, scheduler="dpmpp_2m")
        self.rows: list[Row] = []
        self.flops = 0
        self.rate = matmul_rate(self.device)
        self.peak = next((v * 1e12 for k, v in DATASHEET.items() if k in self.card), None) if self.cuda else None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def run(self, name: str, measure: Callable[[Row], None]) -> None:
        row = Row(name)
        if self.elapsed() > self.args.budget:
            row.note = "skipped: time budget spent"
        else:
            try:
                measure(row)
            except Exception as exc:  # a failing lever is reported; the others still run
                row.note = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:200]
                traceback.print_exc()
        self.rows.append(row)
        torch.compiler.reset()  # each variant compiles afresh, clear of torch's recompile limit
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        print(self.format_row(row), flush=True)
        self.write()

    # diffusers ------------------------------------------------------------------------------

    def diffusers_pipe(self) -> diffusers.StableDiffusionPipeline:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(self.folder, torch_dtype=self.dtype, safety_checker=None)
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, **schedulers.overrides("dpmpp_2m")
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)

    def diffusers_row(self, row: Row, recipe: bool) -> None:
        pipe = self.diffusers_pipe()
        latents = torch.from_numpy(self.latents).to(self.device, self.dtype)
        if recipe:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode="reduce-overhead", fullgraph=True)

        def generate() -> np.ndarray:
            return pipe(PROMPT, num_inference_steps=self.args.steps, guidance_scale=7.5, height=self.size,
                        width=self.size, latents=latents, output_type="np").images[0]

        started = time.perf_counter()
        generate()
        first = time.perf_counter() - started
        row.seconds = median_time(generate, self.device, self.args.repeats)
        if recipe:
            row.compile_s = first - row.seconds
        row.image = np.round(generate() * 255).astype(np.uint8)
        embeds = torch.zeros((2, 77, pipe.text_encoder.config.hidden_size), device=self.device, dtype=self.dtype)
        sample = torch.cat([latents, latents])
        t = torch.tensor(999.0, device=self.device)
        with torch.inference_mode():
            if not self.flops:
                self.flops = unet_flops(pipe.unet, latents, embeds)
            row.unet_ms = 1000 * median_time(lambda: pipe.unet(sample, t, encoder_hidden_states=embeds), self.device, 20)
            row.vae_ms = 1000 * median_time(lambda: pipe.vae.decode(latents), self.device, 10)

    # ours -----------------------------------------------------------------------------------

    def ours_row(self, row: Row, settings: TorchSettings, tuned: bool = False, fp8: bool = False) -> None:
        runtime = TorchRuntime(self.model.path, str(self.device), settings=settings)
        if fp8:
            row.note = f"{fp8_transformer_linears(runtime.unet)} Linears in fp8"
        if tuned:  # fused q/k/v projections and inductor's GEMM/conv tuning: a lever under trial
            runtime.unet.fuse_qkv_projections()
            runtime.vae.fuse_qkv_projections()
        if runtime.has_warm_up:
            with torch._inductor.config.patch(TUNING if tuned else {}):
                row.compile_s = runtime.warm_up(self.size, self.size, steps=self.args.steps)
        pipeline = Pipeline(self.model, runtime)
        pipeline.generate(self.request)
        row.seconds = median_time(lambda: pipeline.generate(self.request), self.device, self.args.repeats)
        row.image = pipeline.generate(self.request).images[0]
        embeds = Conditioning(np.zeros((2, 77, runtime.unet.config.cross_attention_dim), dtype=np.float32))
        if runtime.device_loop:
            from diffusiond.daemon.engine.linear_steps import LinearPlan

            n = self.args.steps
            plan = LinearPlan(np.full(n, 999.0), np.zeros((n, n + 1), np.float32), np.zeros((n + 1, n + 1), np.float32))

            def loop() -> None:
                runtime.denoise(self.latents, embeds, plan, 7.5, lambda k: None, None)

            row.unet_ms = 1000 * median_time(loop, self.device, 5) / n
        else:
            sample = np.concatenate([self.latents, self.latents])

            def step() -> None:
                runtime.predict_noise(sample, np.asarray(999), embeds)

            row.unet_ms = 1000 * median_time(step, self.device, 20)
        row.vae_ms = 1000 * median_time(lambda: runtime.decode(self.latents), self.device, 10)

    # report ---------------------------------------------------------------------------------

    def reference(self, name: str) -> Row | None:
        """Each variant against its family's eager image; ours eager against diffusers eager."""
        family = "diffusers eager" if name.startswith("diffusers") or name == "ours eager" else "ours eager"
        return next((r for r in self.rows if r.name == family and r.image is not None), None)

    def cells(self, row: Row) -> list[str]:
        base = next((r for r in self.rows if r.name == "diffusers eager" and r.seconds), None)
        floor = self.flops / self.rate * 1000 if self.flops else None

        def fmt(value: float | None, spec: str) -> str:
            return "—" if value is None else format(value, spec)

        ref = self.reference(row.name)
        diff = None
        if row.image is not None and ref is not None:
            diff = int(np.abs(row.image.astype(int) - ref.image.astype(int)).max())
            row.pixel_diff = diff
        peak_floor = self.flops / self.peak * 1000 if self.flops and self.peak else None
        return [
            row.name,
            fmt(row.seconds, ".3f"),
            fmt(row.unet_ms, ".2f"),
            fmt(row.vae_ms, ".2f"),
            fmt(row.compile_s, ".1f"),
            fmt(floor / row.unet_ms if floor and row.unet_ms else None, ".2f"),
            fmt(peak_floor / row.unet_ms if peak_floor and row.unet_ms else None, ".2f"),
            fmt(base.seconds / row.seconds if base and row.seconds else None, ".2f") + "×",
            fmt(diff, "d"),
            row.note,
        ]

    HEADER = ("variant", "s/image", "UNet ms/step", "VAE ms", "compile s", "floor (meas.)", "floor (sheet)",
              "vs diffusers eager", "max Δpixel", "note")

    def format_row(self, row: Row) -> str:
        return "  ".join(self.cells(row))

    def markdown(self) -> str:
        peak = f"{self.peak / 1e12:.0f} TFLOP/s." if self.peak else "— (not in the table)."
        lines = [
            f"Card: {self.card}; torch {torch.__version__}, diffusers {diffusers.__version__}; "
            f"{self.size}×{self.size}, {self.args.steps} steps DPM++ 2M, guidance 7.5, {self.dtype}, count 1.",
            f"UNet step (batch 2): {self.flops / 1e12:.3g} TFLOP; matmul rate measured here "
            f"{self.rate / 1e12:.3g} TFLOP/s; datasheet peak {peak}",
            "",
            "| " + " | ".join(self.HEADER) + " |",
            "|" + "---|" * len(self.HEADER),
        ]
        lines += ["| " + " | ".join(self.cells(row)) + " |" for row in self.rows]
        lines.append(f"\nTotal run {self.elapsed():.0f} s.")
        return "\n".join(lines)

    def write(self) -> None:
        if not self.args.out:
            return
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu.md").write_text(self.markdown() + "\n")
        data = {
            "card": self.card, "torch": torch.__version__, "size": self.size, "steps": self.args.steps,
            "unet_step_flops": self.flops, "matmul_flops_per_s": self.rate, "datasheet_flops_per_s": self.peak,
            "rows": [dict(zip(self.HEADER, self.cells(row))) for row in self.rows],
        }
        (out / "gpu.json").write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="folder for gpu.md and gpu.json")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; variants after this are skipped")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, help="default: 512 on CUDA, 128 on the CPU")
    args = parser.parse_args()
    bench = Bench(args)
    print(f"{bench.card}: model {bench.folder}, built in {bench.elapsed():.0f} s", flush=True)
    off = {"compile": "off", "cuda_graphs": "off", "channels_last": "off", "device_loop": "off"}
    bench.run("diffusers eager", lambda row: bench.diffusers_row(row, recipe=False))
    optimised = TorchSettings(compile="on", cuda_graphs="auto", channels_last="on", device_loop="on")
    bench.run("ours optimised", lambda row: bench.ours_row(row, optimised))
    bench.run("diffusers recipe", lambda row: bench.diffusers_row(row, recipe=True))
    bench.run("ours optimised, restart", lambda row: bench.ours_row(row, optimised))
    bench.run("ours eager", lambda row: bench.ours_row(row, TorchSettings(**off)))
    bench.run("ours loop", lambda row: bench.ours_row(row, TorchSettings(**{**off, "device_loop": "on"})))
    if bench.cuda:
        bench.run("ours loop+graphs", lambda row: bench.ours_row(row, TorchSettings(
            **{**off, "device_loop": "on", "cuda_graphs": "on", "channels_last": "on"})))
        bench.run("ours compiled, no graphs", lambda row: bench.ours_row(row, TorchSettings(cuda_graphs="off")))
    bench.run("ours fp8 (trial)", lambda row: bench.ours_row(row, TorchSettings(), fp8=True))
    if bench.cuda:
        bench.run("ours optimised bf16", lambda row: bench.ours_row(row, TorchSettings(precision="bf16")))
        bench.run("ours tuned", lambda row: bench.ours_row(row, TorchSettings(), tuned=True))
    print()
    print(bench.markdown())


if __name__ == "__main__":
    main()
