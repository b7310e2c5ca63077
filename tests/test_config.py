"""The daemon's TOML config: defaults without a file, every key checked, limits applied."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusiond.daemon import config
from diffusiond.daemon.config import Limits
from diffusiond.daemon.engine.pipeline import Request, resolve
from diffusiond.daemon.errors import InvalidParameter


def test_no_file_means_defaults(tmp_path) -> None:
    assert config.load(tmp_path / "absent.toml") == config.Config()


def test_values_and_limits_are_read(tmp_path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('model = "/models/sd15"\noutput_dir = "~/out"\nmax_queued = 5\n[limits]\nsteps = 40\nguidance = 12\n')
    loaded = config.load(path)
    assert loaded.model == "/models/sd15"
    assert loaded.output_dir == Path.home() / "out"
    assert loaded.max_queued == 5
    assert loaded.limits == Limits(steps=40, guidance=12.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("modle = 'x'", "unknown key 'modle'"),
        ("max_queued = 'many'", "max_queued must be int"),
        ("max_queued = true", "max_queued must be int"),
        ("[limits]\nsteps = 1.5", "limits.steps must be int"),
        ("[limits]\nsize_max = 9", "unknown limits ['size_max']"),
        ("[limits]\nsteps = 100000", "limits.steps must be from 1 to 150; got 100000"),
        ("[limits]\nsize = 0", "limits.size must be from 64 to 2048; got 0"),
        ("[limits]\nprompt_chars = -5", "limits.prompt_chars must be from 1 to 4000; got -5"),
        ("model = ", "cannot read config"),
        ("precision = 'fp8'", "precision must be one of auto, fp16, bf16, fp32; got 'fp8'"),
        ("compute_units = 'gpu'", "compute_units must be one of auto, cpuAndGPU"),
        ("local_worker = 'no'", "local_worker must be bool"),
        ("local_worker = false", "local_worker = false needs tcp"),
    ],
)
def test_bad_files_are_refused_with_the_key_named(tmp_path, text, message) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.load(path)


def test_lowered_limits_are_enforced(tiny) -> None:
    with pytest.raises(InvalidParameter, match="from 1 to 40"):
        resolve(Request("p", steps=41), tiny, Limits(steps=40))
    assert resolve(Request("p", steps=40), tiny, Limits(steps=40)).steps == 40
