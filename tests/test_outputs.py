"""The images on disk and the job's record agree: whole PNGs, the umask's mode, none kept from a
job that could not write them all. The real daemon writes to real filesystems."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

FAST = {"steps": 1, "width": 64, "height": 64, "guidance_scale": 1.0}


def test_images_get_the_mode_the_umask_gives(daemon) -> None:
    job_id = daemon.call("submit", prompt="for sharing", **FAST)["job"]["id"]
    job = daemon.wait_job(job_id)
    umask = os.umask(0)
    os.umask(umask)  # the daemon inherited this one
    assert stat.S_IMODE(os.stat(job["outputs"][0]).st_mode) == 0o666 & ~umask


def assert_nothing_kept(job: dict, folder: Path) -> None:
    assert job["state"] == "failed" and job["error"]["code"] == "output_error", job
    assert "image 2 of 3" in job["error"]["message"] and "none of the job's images is kept" in job["error"]["message"]
    assert job["outputs"] == []
    assert [p.name for p in folder.iterdir() if p.is_file()] == [], "the record says no images: so does the disk"


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of its own size: a tmpfs, which only root may mount."""
    if os.getuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()

    def mount(size: int) -> Path:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        return mount_point

    yield mount
    subprocess.run(["umount", str(mount_point)], capture_output=True)


def test_a_full_disk_keeps_none_of_the_images_of_a_job_that_could_not_write_them_all(daemon, small_disk) -> None:
    settings = {"prompt": "three images", "seed": 3, "steps": 1, "width": 128, "height": 128, "guidance_scale": 1.0}
    one = daemon.wait_job(daemon.call("submit", **settings)["job"]["id"])
    size = os.stat(one["outputs"][0]).st_size
    folder = small_disk(size * 3 // 2)  # room for one image of the three, not two
    job = daemon.wait_job(daemon.call("submit", **settings, count=3, output_dir=str(folder))["job"]["id"])
    assert "No space left on device" in job["error"]["message"]
    assert_nothing_kept(job, folder)


def test_an_image_that_cannot_be_written_takes_the_others_with_it(daemon, tmp_path) -> None:
    """The same rule on any machine: a folder in the way of image 2 is a write that fails."""
    daemon.call("pause")
    try:
        job_id = daemon.call("submit", prompt="three", count=3, output_dir=str(tmp_path), **FAST)["job"]["id"]
        (tmp_path / f"{job_id}-2.png").mkdir()
    finally:
        daemon.call("resume")
    assert_nothing_kept(daemon.wait_job(job_id), tmp_path)


def test_a_named_job_takes_the_first_free_names_and_records_them(daemon, tmp_path) -> None:
    (tmp_path / "shot.png").write_bytes(b"not ours")
    job_id = daemon.call("submit", prompt="named", count=2, output_dir=str(tmp_path), output_name="shot",
                         **FAST)["job"]["id"]
    job = daemon.wait_job(job_id)
    assert job["outputs"] == [str(tmp_path / "shot-2.png"), str(tmp_path / "shot-3.png")]
    assert all(Path(path).is_file() for path in job["outputs"])
    assert (tmp_path / "shot.png").read_bytes() == b"not ours"


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "a\\b", "x" * 241])
def test_an_output_name_that_is_not_a_plain_file_name_is_refused(daemon, name) -> None:
    reply = daemon.call("submit", prompt="p", output_name=name, **FAST)
    assert reply["error"]["code"] == "invalid_parameter" and "output_name" in reply["error"]["message"]
