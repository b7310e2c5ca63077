"""`diffuse` as a user runs it: a real process against the real daemon on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from diffusiond.clients.infotext import parse_infotext
from diffusiond.clients.pngtext import read_text

SLOW = ["--steps", "150", "--size", "256x256"]


def diffuse(daemon, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(daemon.runtime_dir), *args],
        capture_output=True, text=True, timeout=timeout,
    )


def start_diffuse(daemon, *args: str) -> subprocess.Popen:
    """`diffuse` as a terminal starts it: Ctrl-C's SIGINT at its default, even when the suite itself
    runs in the background, where the shell hands its children SIGINT ignored."""
    return subprocess.Popen(
        [sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(daemon.runtime_dir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_images_carry_the_flags_given(daemon, tmp_path) -> None:
    done = diffuse(daemon, "a lighthouse at dusk", "-n", "fog", "--steps", "3", "-g", "5.5", "--seed", "77",
                   "--size", "64x128", "--scheduler", "euler_a", "--count", "2", "-o", str(tmp_path))
    assert done.returncode == 0, done.stderr
    paths = done.stdout.split()
    assert len(paths) == 2 and all(path.startswith(str(tmp_path)) for path in paths)
    info = parse_infotext(read_text(paths[1])["parameters"])
    assert (info.prompt, info.negative_prompt) == ("a lighthouse at dusk", "fog")
    params = info.params
    assert (params["Steps"], params["CFG scale"], params["Seed"], params["Size"], params["Sampler"]) == (
        "3", "5.5", "77", "64x128", "Euler a")
    assert (params["Batch size"], params["Batch pos"]) == ("2", "1")
    assert pixels(paths[1]).shape == (128, 64, 3)


def test_reuse_reproduces_an_image_bit_for_bit_and_flags_override(daemon, tmp_path) -> None:
    first = diffuse(daemon, "a castle", "--steps", "4", "--size", "64x64", "-o", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    original = first.stdout.split()[0]
    again = diffuse(daemon, "--reuse", original, "-o", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr
    assert np.array_equal(pixels(original), pixels(again.stdout.split()[0]))
    tweaked = diffuse(daemon, "--reuse", original, "-g", "3", "-o", str(tmp_path / "c"))
    tweaked_params = parse_infotext(read_text(tweaked.stdout.split()[0])["parameters"]).params
    original_params = parse_infotext(read_text(original)["parameters"]).params
    assert tweaked_params["Seed"] == original_params["Seed"] and tweaked_params["CFG scale"] == "3.0"
    assert not np.array_equal(pixels(original), pixels(tweaked.stdout.split()[0]))


def test_ctrl_c_cancels_the_job_in_the_daemon(daemon) -> None:
    process = start_diffuse(daemon, "interrupt me", *SLOW)
    deadline = time.monotonic() + 60
    running = []
    while not running and time.monotonic() < deadline:
        running = daemon.call("list", states=["running"])["jobs"]
    assert running, "the job never started"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 3, stderr
    assert f"cancelling job {running[0]['id']}" in stderr
    assert daemon.call("get", job=running[0]["id"])["job"]["state"] == "cancelled"


def test_watch_json_follows_a_job_through_its_whole_life(daemon) -> None:
    daemon.call("pause")
    try:
        job_id = diffuse(daemon, "watched", "--steps", "3", "--size", "64x64", "--no-wait").stdout.strip()
        watcher = start_diffuse(daemon, "--json", "watch", job_id)
        first = json.loads(watcher.stdout.readline())  # the job as it stands: watch is live from here
        assert first["type"] == "job.resync" and first["state"]["state"] == "queued"
    finally:
        daemon.call("resume")
    lines, _ = watcher.communicate(timeout=60)
    events = [json.loads(line) for line in lines.splitlines()]
    assert watcher.returncode == 0
    kinds = [event["type"] for event in events]
    assert kinds == ["job.started", "job.progress", "job.progress", "job.progress", "job.done"]
    assert all(event["job"] == job_id for event in events)


def test_no_wait_show_jobs_cancel_and_retry(daemon) -> None:
    daemon.call("pause")
    try:
        job_id = diffuse(daemon, "later", "--steps", "1", "--size", "64x64", "--no-wait").stdout.strip()
        shown = json.loads(diffuse(daemon, "--json", "show", job_id).stdout)
        assert shown["state"] == "queued" and shown["params"]["prompt"] == "later"
        assert job_id in diffuse(daemon, "jobs", "--state", "queued").stdout
        assert diffuse(daemon, "cancel", "--all").stdout.split() == [job_id]
        assert diffuse(daemon, "cancel", job_id).returncode == 2  # finished already: invalid_state
    finally:
        daemon.call("resume")
    assert diffuse(daemon, "retry", job_id).returncode == 0
    assert daemon.wait_job(job_id)["state"] == "done"
    status = json.loads(diffuse(daemon, "--json", "status").stdout)
    assert status["ready"] and status["models"]["loaded"] == ["tiny"]


def test_bad_arguments_exit_2_with_the_reason(daemon) -> None:
    refused = diffuse(daemon, "x", "--size", "65x64")
    assert refused.returncode == 2 and "width: must be a multiple of 8" in refused.stderr
    assert diffuse(daemon, "x", "--steps", "many").returncode == 2
    assert diffuse(daemon, "--reuse", "/nonexistent.png").returncode == 2


def test_unreachable_daemon_is_reported_fast(tmp_path) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(tmp_path), "a prompt"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 4
    assert "no diffusiond answers" in done.stderr and "diffusiond start" in done.stderr
    assert time.monotonic() - started < 10


def test_a_silent_socket_times_out_with_exit_4(tmp_path) -> None:
    """A socket file nobody serves (a daemon hung or killed uncleanly) must not hang the CLI."""
    import zmq

    context = zmq.Context()
    silent = context.socket(zmq.ROUTER)
    silent.bind(f"ipc://{tmp_path}/request")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(tmp_path), "status"],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        context.destroy(linger=0)
    assert done.returncode == 4 and "no reply to ping" in done.stderr


def test_clients_import_without_numpy_torch_coremltools_or_pillow() -> None:
    code = (
        "import sys\n"
        "for name in ('numpy', 'torch', 'coremltools', 'PIL', 'transformers', 'diffusers'):\n"
        "    sys.modules[name] = None\n"
        "import diffusiond.clients, diffusiond.clients.cli, diffusiond.clients.infotext, diffusiond.clients.pngtext\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_diffusiond_start_and_stop(fresh) -> None:
    env = {**os.environ, "DIFFUSIOND_CONFIG": str(fresh.config)}
    started = subprocess.run([sys.executable, "-m", "diffusiond.daemon.cli", "start"], capture_output=True,
                             text=True, timeout=300, env=env)
    assert started.returncode == 0, started.stderr
    assert "ready" in started.stderr
    assert fresh.call("ping")["ready"]
    again = subprocess.run([sys.executable, "-m", "diffusiond.daemon.cli", "start"], capture_output=True,
                           text=True, timeout=60, env=env)
    assert again.returncode == 0 and "running already" in again.stderr
    stopped = subprocess.run([sys.executable, "-m", "diffusiond.daemon.cli", "stop"], capture_output=True,
                             text=True, timeout=120, env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stderr
    status = subprocess.run([sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(fresh.runtime_dir),
                             "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 4
