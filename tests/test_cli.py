"""`diffusiond generate` as a user runs it: a real process, a real PNG, clear failures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from diffusiond.clients.infotext import parse_infotext
from diffusiond.daemon.png import read_parameters

ROOT = Path(__file__).resolve().parent.parent


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffusiond.daemon.cli", "generate", *args],
        capture_output=True, text=True, timeout=300,
    )


def test_generate_writes_pngs_with_their_settings(tmp_path) -> None:
    out = tmp_path / "lighthouse.png"
    done = generate("a lighthouse at dusk", "-o", str(out), "--steps", "3", "--size", "64x96", "--seed", "9",
                    "--count", "2", "--scheduler", "euler_a")
    assert done.returncode == 0, done.stderr
    paths = done.stdout.split()
    assert paths == [str(out), str(tmp_path / "lighthouse-2.png")]
    assert "step   3/3" in done.stderr  # the progress bar reached the end
    info = parse_infotext(read_parameters(out))
    assert info.prompt == "a lighthouse at dusk"
    assert info.params["Seed"] == "9" and info.params["Sampler"] == "Euler a" and info.params["Size"] == "64x96"


def test_bad_parameters_exit_2_with_the_reason(tmp_path) -> None:
    done = generate("x", "-o", str(tmp_path / "x.png"), "--size", "100x64")
    assert done.returncode == 2
    assert "width: must be a multiple of 8" in done.stderr
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
