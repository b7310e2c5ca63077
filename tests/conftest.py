from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from diffusiond.daemon.models.catalog import TINY
from diffusiond.daemon.models.diffusers_folder import ModelFolder

# Two cores: keep torch from oversubscribing them while pytest runs.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny() -> ModelFolder:
    return ModelFolder.open("tiny")


@pytest.fixture(scope="session")
def runtime(tiny):
    from diffusiond.daemon.engine.runtimes.torch_runtime import TorchRuntime

    return TorchRuntime(tiny.path, "cpu")


@pytest.fixture(scope="session")
def tiny_with_safety_checker(tmp_path_factory) -> Path:
    """The tiny model plus a tiny safety checker whose thresholds flag every image."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    folder = tmp_path_factory.mktemp("models") / "tiny-safety"
    shutil.copytree(TINY, folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": 32, "patch_size": 8,
        },
        projection_dim=8,
    )
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)  # cosine ≥ -1 always beats -2: every image flagged
    checker.save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor"
    )
    index = json.loads((folder / "model_index.json").read_text())
    index.update(
        feature_extractor=["transformers", "CLIPImageProcessor"],
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        requires_safety_checker=True,
    )
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """The real daemon on the tiny model, shared by a test module."""
    from .daemon_process import Daemon

    running = Daemon(tmp_path_factory.mktemp("daemon")).start()
    yield running
    assert running.stop() == 0
    running.close()


@pytest.fixture
def fresh(tmp_path):
    """A daemon of the test's own, not started, for tests that kill or restart it."""
    from .daemon_process import Daemon

    running = Daemon(tmp_path)
    yield running
    running.close()
