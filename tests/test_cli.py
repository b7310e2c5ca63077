"""`diffusiond generate` as a user runs it: a real process, a real PNG, clear failures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusiond.clients.infotext import parse_infotext
from diffusiond.daemon.engine.png import read_parameters

ROOT = Path(__file__).resolve().parent.parent


def generate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffusiond.daemon.cli", "generate", *args],
        capture_output=True, text=True, timeout=300, env=None if env is None else {**os.environ, **env},
    )


def test_generate_writes_pngs_with_their_settings(tmp_path) -> None:
    out = tmp_path / "lighthouse.png"
    done = generate("a lighthouse at dusk", "-o", str(out), "--steps", "3", "--size", "64x96", "--seed", "9",
                    "--count", "2", "--scheduler", "euler_a", env={"DIFFUSE_PROGRESS": "1"})
    assert done.returncode == 0, done.stderr
    paths = done.stdout.split()
    assert paths == [str(out), str(tmp_path / "lighthouse-2.png")]
    assert "step   3/3" in done.stderr  # the progress bar reached the end
    info = parse_infotext(read_parameters(out))
    assert info.prompt == "a lighthouse at dusk"
    assert info.params["Seed"] == "9" and info.params["Sampler"] == "Euler a" and info.params["Size"] == "64x96"


def test_a_folder_here_named_like_a_hub_id_is_generated_from_not_downloaded(tmp_path) -> None:
    """The daemon reads `org/name` as a Hub id whatever its disk holds (models/ref.py); the command
    line, which knows its working directory, passes a folder there as its absolute path."""
    import shutil

    from diffusiond.daemon.models.catalog import TINY

    shutil.copytree(TINY, tmp_path / "org" / "name")
    done = subprocess.run(
        [sys.executable, "-m", "diffusiond.daemon.cli", "generate", "x", "-m", "org/name", "--steps", "1",
         "--size", "64x64", "-o", str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "x.png").exists()


def test_bad_parameters_exit_2_with_the_reason(tmp_path) -> None:
    done = generate("x", "-o", str(tmp_path / "x.png"), "--size", "100x64")
    assert done.returncode == 2
    assert "width: must be a multiple of 8" in done.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def piped(tmp_path_factory) -> subprocess.CompletedProcess:
    """One `diffusiond generate` with stderr into a pipe, as a script or a log would run it."""
    done = generate("x", "-o", str(tmp_path_factory.mktemp("piped") / "x.png"), "--steps", "2", "--size", "64x64")
    assert done.returncode == 0, done.stderr
    return done


def test_into_a_pipe_no_progress_bar_is_drawn(piped) -> None:
    assert "\x1b" not in piped.stderr and "\r" not in piped.stderr


def test_a_model_loads_quietly_saying_once_what_it_loads(piped) -> None:
    assert "accelerate" not in piped.stderr and "Loading weights" not in piped.stderr
    assert piped.stderr.splitlines() == ["loading shapes …", piped.stderr.splitlines()[-1]]
    assert piped.stderr.splitlines()[-1].startswith("seed ")


def test_arguments_are_checked_before_the_model_loads(tmp_path) -> None:
    for bad, reason in ((["--steps", "0"], "steps: must be an integer from 1"), (["--size", "0x0"], "width:"),
                        (["--count", "99"], "count:")):
        started = time.monotonic()
        done = generate("x", "-o", str(tmp_path / "x.png"), *bad)
        assert done.returncode == 2 and reason in done.stderr, done.stderr
        assert "loading" not in done.stderr, f"{bad} was refused only after loading the model"
        assert time.monotonic() - started < 30
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    done = generate("x", "-o", str(tmp_path / "x.png"), "--init-image", str(text))
    assert done.returncode == 2 and "not an image PIL can read" in done.stderr and "Traceback" not in done.stderr
    done = generate("   ", "-o", str(tmp_path / "x.png"))
    assert done.returncode == 2 and "prompt: holds only spaces" in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_missing_model_says_what_to_give(tmp_path) -> None:
    done = generate("x", "--model", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert "no diffusers model at" in done.stderr and "tiny" in done.stderr


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^    (python3 -m venv .*)$", readme, flags=re.M)
    assert len(commands) == 2, "README opens with two commands: the main job, then the tests"
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
