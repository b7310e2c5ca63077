"""The GPU path on the CPU: the device loop's scheduler table against the NumPy schedulers, and the
optimised runtime's images against the eager runtime's.

torch.compile is not exercised here: compiling even the tiny model takes about 90 s on two cores;
bench/gpu.py compiles and compares images (docs/gpu.md). CUDA graphs need a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusiond.daemon.engine import linear_steps, schedulers
from diffusiond.daemon.engine.pipeline import Pipeline, Request
from diffusiond.daemon.engine.runtimes.torch_runtime import TorchRuntime, TorchSettings
from diffusiond.daemon.errors import Cancelled

LINEAR = ("pndm", "dpmpp_2m", "dpmpp_2m_karras", "euler", "ddim")
SD15 = {"clip_sample": False}  # SD 1.5's config states it; the tiny model's leaves DDIM's default (True)


def fake_unet(sample: np.ndarray, k: int) -> np.ndarray:
    """A nonlinear stand-in for the UNet, so each step's input matters as in a real run."""
    return (np.tanh(sample) * 0.7 + np.float32(0.01 * k)).astype(np.float32)


def host_loop(scheduler, timesteps, latents):
    """The pipeline's own loop (unguided): scale, predict, step; the latents after every step."""
    out = []
    for k, t in enumerate(timesteps):
        prediction = fake_unet(scheduler.scale_model_input(latents, t), k)
        latents = scheduler.step(prediction, t, latents)
        out.append(latents)
    return out


def plan_loop(plan: linear_steps.LinearPlan, latents):
    """The device loop's arithmetic in NumPy: inputs and latents as rows over the atoms."""
    atoms = [latents]
    out = []
    for k in range(plan.steps):
        atoms.append(fake_unet(linear_steps.combine(plan.inputs[k], np.stack(atoms)), k))
        out.append(linear_steps.combine(plan.latents[k + 1], np.stack(atoms)))
    return out


@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 25, 100])
def test_traced_plan_steps_as_the_numpy_scheduler(name, steps, tiny) -> None:
    scheduler = schedulers.create(name, {**tiny.scheduler_config, **SD15})
    scheduler.set_timesteps(steps)
    plan = linear_steps.trace(scheduler, scheduler.timesteps)
    assert plan is not None
    latents = np.random.default_rng(steps).standard_normal((2, 4, 8, 8)).astype(np.float32)
    latents *= np.float32(scheduler.init_noise_sigma)
    expected = host_loop(scheduler, scheduler.timesteps, latents)
    got = plan_loop(plan, latents)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler", "pndm"])
def test_traced_plan_follows_img2img_begin_index(name, tiny) -> None:
    scheduler = schedulers.create(name, tiny.scheduler_config)
    scheduler.set_timesteps(20)
    scheduler.set_begin_index(8)
    timesteps = scheduler.timesteps[8:]
    plan = linear_steps.trace(scheduler, timesteps)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    expected = host_loop(scheduler, timesteps, latents)[-1]
    np.testing.assert_allclose(plan_loop(plan, latents)[-1], expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


@pytest.mark.parametrize(("name", "config"), [("euler_a", {}), ("lcm", {}), ("ddim", {"clip_sample": True})])
def test_schedulers_that_draw_noise_or_clip_are_not_traced(name, config, tiny) -> None:
    scheduler = schedulers.create(name, {**tiny.scheduler_config, **config})
    scheduler.set_timesteps(4)
    assert linear_steps.trace(scheduler, scheduler.timesteps) is None


def test_auto_settings_change_nothing_on_the_cpu(runtime) -> None:
    assert (runtime.dtype, runtime.compiles, runtime.graphs, runtime.device_loop) == (torch.float32, False, False, False)
    assert not runtime.has_warm_up
    assert runtime.memory_format == torch.contiguous_format
    cpu = torch.device("cpu")
    assert TorchSettings(cuda_graphs="on").on("cuda_graphs", cpu) is False
    assert TorchSettings(device_loop="on").on("device_loop", cpu) is True
    assert TorchSettings(precision="bf16").dtype(cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="compile must be one of"):
        TorchSettings(compile="yes")
    with pytest.raises(ValueError, match="precision must be"):
        TorchSettings(precision="fp8")


@pytest.fixture(scope="module")
def fast(tiny) -> Pipeline:
    """The optimised path as far as the CPU has it: the device loop, channels_last, SDPA."""
    runtime = TorchRuntime(tiny.path, "cpu", settings=TorchSettings(device_loop="on", channels_last="on"))
    return Pipeline(tiny, runtime)


@pytest.fixture(scope="module")
def eager(tiny, runtime) -> Pipeline:
    return Pipeline(tiny, runtime)


def test_optimised_runtime_keeps_sdpa_and_channels_last(fast) -> None:
    runtime = fast.runtime
    assert {type(p).__name__ for p in runtime.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert runtime.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("scheduler", "guidance", "count"),
    [("dpmpp_2m", 7.5, 1), ("dpmpp_2m_karras", 7.5, 2), ("euler", 7.5, 1), ("pndm", 1.0, 2), ("euler_a", 7.5, 1)],
)
def test_device_loop_gives_the_host_loops_image(fast, eager, scheduler, guidance, count) -> None:
    """Same image to 1/255 and the same latents to float32 rounding at every reported step."""
    request = Request("a lighthouse", steps=15, guidance_scale=guidance, count=count, seed=7, scheduler=scheduler,
                      width=64, height=64)
    seen: dict[str, list] = {"fast": [], "eager": []}
    a = eager.generate(request, on_step=lambda s, n, latents: seen["eager"].append((s, n, latents.copy())))
    fast.runtime._loops.clear()
    b = fast.generate(request, on_step=lambda s, n, latents: seen["fast"].append((s, n, latents.copy())))
    # The device loop ran, except for Euler a, which draws noise and so stays in the host loop.
    assert bool(fast.runtime._loops) == (scheduler != "euler_a")
    assert [x[:2] for x in seen["fast"]] == [x[:2] for x in seen["eager"]]
    for (_, _, x), (_, _, y) in zip(seen["fast"], seen["eager"]):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4 * float(np.abs(y).max()))
    for x, y in zip(a.images, b.images):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


def test_device_loop_cancels_within_two_steps(fast) -> None:
    """The device queues step k + 1 before step k's latents reach the host: one step later than the host loop."""
    reported = []
    fast.runtime._loops.clear()
    with pytest.raises(Cancelled):
        fast.generate(
            Request("a lighthouse", steps=10, seed=1, width=64, height=64),
            on_step=lambda s, n, latents: reported.append(s),
            cancelled=lambda: bool(reported),
        )
    assert reported == [1]
    assert fast.runtime._loops


def test_warm_up_prepares_the_loop_the_first_job_uses(fast) -> None:
    fast.runtime._loops.clear()
    assert fast.runtime.warm_up(64, 64, steps=20) >= 0
    warmed = list(fast.runtime._loops)
    fast.generate(Request("a lighthouse", steps=20, seed=1, width=64, height=64))
    assert list(fast.runtime._loops) == warmed and len(warmed) == 1


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_the_gpu_check_without_torch_agrees_with_the_device_torch_picks(device) -> None:
    """Whether a pull fetches fp16 weights is decided without importing torch; on this machine the
    answer must be torch's own (on the GPU machine too, where "auto" picks CUDA)."""
    from diffusiond.daemon.coreml.hardware import has_gpu
    from diffusiond.daemon.engine.runtimes.torch_runtime import pick_device

    assert has_gpu(device) == (pick_device(device).type != "cpu")
