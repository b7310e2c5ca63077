"""Bad input from a new user, or from a client written from docs/protocol.md alone: each gets a
clear error with a stable code — before anything is queued where it can be — never a traceback,
and never a silent substitute (issue 15)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgpack
from PIL import Image

from diffusiond.clients.client import Client, RequestFailed
from diffusiond.clients.protocol import MAX_MESSAGE_BYTES, Code
from diffusiond.daemon.models.catalog import TINY

FAST = ["--steps", "1", "--size", "64x64"]


def diffuse(daemon, *args: str | bytes, cwd: Path | None = None, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(daemon.runtime_dir), *args],
        stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120, cwd=cwd,
    )


def job_count(daemon) -> int:
    return sum(daemon.call("ping")["queue"].values())


def refused_before_submitting(daemon, *args: str) -> str:
    """Run `diffuse`, expect exit 2 without a traceback and without a job queued; its stderr."""
    before = job_count(daemon)
    done = diffuse(daemon, *args)
    assert done.returncode == 2, (args, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert job_count(daemon) == before, f"{args} queued a job"
    return done.stderr


def error_of(reply: dict) -> tuple[str, str]:
    assert reply["ok"] is False, reply
    return reply["error"]["code"], reply["error"]["message"]


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buffer, format="PNG")
    return buffer.getvalue()


# -- the command line -----------------------------------------------------------------------------


def test_integers_beyond_64_bits_are_refused_naming_the_field(daemon) -> None:
    huge = str(2**70)
    for flag, name in (("--seed", "seed"), ("--steps", "steps"), ("--priority", "priority"), ("--count", "count")):
        stderr = refused_before_submitting(daemon, "a cat", flag, huge)
        assert f"{name}: {huge} does not fit in 64 bits" in stderr and "(invalid_parameter)" in stderr
    stderr = refused_before_submitting(daemon, "a cat", "--size", f"{huge}x64")
    assert "width:" in stderr


def test_zero_sizes_are_refused_not_taken_for_the_default(daemon) -> None:
    assert "width: must be a multiple of 8 from 64" in refused_before_submitting(daemon, "a cat", "--size", "0x0")
    assert "width: must be a multiple of 8 from 64" in refused_before_submitting(daemon, "a cat", "--size", "0x64")
    assert "height: must be a multiple of 8 from 64" in refused_before_submitting(daemon, "a cat", "--size", "64x0")


def test_a_1x1_init_image_is_refused_not_scaled_to_the_model_size(daemon) -> None:
    code, message = error_of(daemon.call("submit", prompt="a cat", init_image=png(1, 1), steps=2))
    assert code == Code.INVALID_PARAMETER and "init_image: is 1x1" in message and "give a size" in message
    # With a size given, a small image is scaled to it, as diffusers does.
    assert daemon.call("submit", prompt="a cat", init_image=png(1, 1), steps=2, width=64, height=64)["ok"]


def test_a_relative_model_path_is_the_clients_folder(daemon, tmp_path) -> None:
    shutil.copytree(TINY, tmp_path / "models" / "x")
    for name in ("models/x", "./models/x"):
        done = diffuse(daemon, "--json", "a cat", "-m", name, *FAST, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["model"] == str(tmp_path / "models" / "x")


def test_an_init_image_that_is_text_says_so_in_words(daemon, tmp_path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    stderr = refused_before_submitting(daemon, "a cat", "--init-image", str(text))
    assert "init_image: not an image" in stderr and "PNG, JPEG" in stderr and "BytesIO" not in stderr


def test_a_negative_timeout_is_refused_before_submitting(daemon) -> None:
    for value in ("-1", "0", "nan"):
        assert "seconds must be" in refused_before_submitting(daemon, "a cat", *FAST, "--timeout", value)


def test_an_empty_path_is_refused_not_taken_for_this_folder(daemon) -> None:
    for flag in ("-o", "--init-image", "--reuse"):
        assert "an empty path" in refused_before_submitting(daemon, "a cat", *FAST, flag, "")


def test_a_prompt_of_only_spaces_is_refused(daemon) -> None:
    assert "prompt: holds only spaces" in refused_before_submitting(daemon, "   ", *FAST)
    code, _ = error_of(daemon.call("submit", prompt=" \t\n "))
    assert code == Code.INVALID_PARAMETER


def test_a_prompt_that_is_not_unicode_is_refused_by_the_client(daemon) -> None:
    # Undecodable bytes on the command line reach Python as lone surrogates.
    done = subprocess.run(
        [sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(daemon.runtime_dir), b"caf\xe9", *FAST],
        capture_output=True, timeout=60,
    )
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 2 and "Traceback" not in stderr, stderr
    assert "prompt: not valid text" in stderr and "(invalid_parameter)" in stderr
    with Client(daemon.runtime_dir) as client:
        try:
            client.submit("a \udcff cat")
        except RequestFailed as exc:
            assert exc.code == Code.INVALID_PARAMETER and "character 2" in exc.message
        else:
            raise AssertionError("a lone surrogate was sent")


def test_show_is_for_people(daemon) -> None:
    job_id = daemon.call("submit", prompt="a cat\non two lines", steps=1, width=64, height=64)["job"]["id"]
    daemon.wait_job(job_id)
    shown = diffuse(daemon, "show", job_id)
    assert shown.returncode == 0, shown.stderr
    created = time.strftime("%Y-%m-%d", time.localtime(daemon.call("get", job=job_id)["job"]["created"]))
    assert f"created: {created}" in shown.stdout
    assert "{'" not in shown.stdout and "'prompt'" not in shown.stdout
    assert "          prompt  a cat\n                  on two lines" in shown.stdout
    assert "           steps  1" in shown.stdout


def test_show_into_a_closed_pipe_ends_quietly(daemon) -> None:
    job_id = daemon.call("submit", prompt="a cat", steps=1, width=64, height=64)["job"]["id"]
    read, write = os.pipe()
    os.close(read)  # like `| head` that has read its fill: every write now fails
    try:
        done = diffuse(daemon, "show", job_id, stdout=write)
    finally:
        os.close(write)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_cancel_all_says_what_it_did(daemon) -> None:
    daemon.call("pause")
    try:
        job_id = daemon.call("submit", prompt="later", steps=1, width=64, height=64)["job"]["id"]
        first = diffuse(daemon, "cancel", "--all")
        assert first.stdout.split() == [job_id] and "cancelled 1 queued job;" in first.stderr
        again = diffuse(daemon, "cancel", "--all")
        assert again.returncode == 0 and again.stdout == ""
        assert "cancelled 0 queued jobs (none was queued)" in again.stderr
    finally:
        daemon.call("resume")


def test_watch_of_a_job_opens_with_its_state_not_a_resync(daemon) -> None:
    job_id = daemon.call("submit", prompt="watched", steps=20, width=64, height=64)["job"]["id"]
    done = diffuse(daemon, "watch", job_id)
    lines = done.stdout.splitlines()
    assert "missed" not in lines[0] and f"{job_id} is " in lines[0], lines[0]
    assert "job.done" in lines[-1]


# -- the protocol, as docs/protocol.md states it ----------------------------------------------------


def test_a_wrong_typed_field_is_bad_message_naming_the_field_and_its_type(daemon) -> None:
    code, message = error_of(daemon.call("submit", prompt=5))
    assert (code, message) == (Code.BAD_MESSAGE, "prompt: must be a string, got an integer")
    code, message = error_of(daemon.call("submit", prompt="a cat", steps="9"))
    assert (code, message) == (Code.BAD_MESSAGE, "steps: must be an integer, got a string")
    code, message = error_of(daemon.call("submit", prompt="a cat", guidance_scale=True))
    assert (code, message) == (Code.BAD_MESSAGE, "guidance_scale: must be a number, got true or false")


def test_version_true_is_not_version_1(daemon) -> None:
    assert error_of(daemon.call("ping", v=True))[0] == Code.UNSUPPORTED_VERSION


def test_a_missing_required_field_is_invalid_parameter_naming_it(daemon) -> None:
    assert error_of(daemon.call("submit")) == (Code.INVALID_PARAMETER, "prompt: required")
    for op in ("get", "cancel", "retry"):
        assert error_of(daemon.call(op)) == (Code.INVALID_PARAMETER, "job: required"), op


def test_message_too_large_echoes_the_request_id_when_it_has_one(daemon) -> None:
    reply = daemon.call("submit", prompt="a cat", init_image=b"\0" * (MAX_MESSAGE_BYTES + 1))
    assert error_of(reply)[0] == Code.MESSAGE_TOO_LARGE  # daemon.call asserts the id came back
    socket = daemon.client()
    try:
        socket.send(msgpack.packb({"v": 1, "op": "ping", "pad": b"\0" * (MAX_MESSAGE_BYTES + 1)}))
        reply = daemon.receive(socket)
    finally:
        socket.close()
    assert reply["id"] is None and reply["error"]["code"] == Code.MESSAGE_TOO_LARGE


def test_the_client_gets_message_too_large_at_once(daemon) -> None:
    with Client(daemon.runtime_dir, timeout=30) as client:
        started = time.monotonic()
        try:
            client.submit("a cat", init_image=b"\0" * (20 * 1024 * 1024))
        except RequestFailed as exc:
            assert exc.code == Code.MESSAGE_TOO_LARGE
        else:
            raise AssertionError("a 20 MiB request was accepted")
        assert time.monotonic() - started < 10


def test_the_daemon_still_serves_after_all_of_it(daemon) -> None:
    assert daemon.call("ping")["ready"]



def test_the_error_codes_documented_are_the_codes_the_protocol_names_and_the_engine_raises() -> None:
    """One registry: docs/protocol.md's table, clients.protocol.Code and the codes of the errors a job
    can fail with are the same set, so a client can branch on every code it is sent."""
    import re

    from diffusiond.daemon import errors
    from diffusiond.daemon.models import store

    table = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text().split("## Error codes", 1)[1]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    named = {value for key, value in vars(Code).items() if key.isupper()}
    assert documented == named
    job_errors = [errors.InvalidParameter, errors.ModelNotFound, errors.ModelInvalid, errors.Cancelled,
                  store.DownloadFailed, store.InsufficientDisk]
    assert {error.code for error in job_errors} <= named
