"""The hot folder with the real daemon and real filesystem events: exactly once, whatever dies."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from diffusiond.clients.infotext import parse_infotext
from diffusiond.clients.pngtext import read_text

PARAMS = "Steps: 1, Size: 64x64, CFG scale: 1"


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_hot_folder_left_running():
    """A test that fails half-way leaves no hot folder behind."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


class HotFolderProcess:
    def __init__(self, daemon, folder: Path) -> None:
        self.daemon, self.folder = daemon, folder
        self.log = folder.parent / f"{folder.name}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> HotFolderProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "diffusiond.clients.cli", "--runtime-dir", str(self.daemon.runtime_dir),
             "--json", "hotfolder", str(self.folder), "--settle", "1"],
            stdout=open(self.log, "a"), stderr=subprocess.STDOUT,
        )
        STARTED.append(self.process)
        return self

    def reports(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


def files_in(folder: Path, pattern: str = "*") -> list[Path]:
    return sorted(folder.glob(pattern)) if folder.exists() else []


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def drop(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)


def slow_writer(path: Path, text: str, first_chunk_written: threading.Event, go_on: threading.Event) -> None:
    """One open file, written in chunks with pauses shorter than the settle time, closed at the end."""
    chunks = [text[i : i + 6] for i in range(0, len(text), 6)]
    with open(path, "w") as file:
        file.write(chunks[0])
        file.flush()
        first_chunk_written.set()
        go_on.wait(60)
        for chunk in chunks[1:]:
            time.sleep(0.1)
            file.write(chunk)
            file.flush()


def assert_exactly_once(folder: Path, prompts: set[str], jobs: list[dict]) -> None:
    done = files_in(folder / "done", "*.txt")
    images = files_in(folder / "out", "*.png")
    assert len(done) == len(prompts) and files_in(folder / "failed") == []
    assert files_in(folder, "*.txt") == []
    seen = [parse_infotext(read_text(image)["parameters"]).prompt for image in images]
    assert sorted(seen) == sorted(prompts), "every prompt once, whole (none read half-way), none twice"
    assert {image.stem for image in images} == {path.stem for path in done}
    ours = [job for job in jobs if job["output_dir"] == str((folder / "out").resolve())]
    assert len(ours) == len(prompts), "one job per file, across every restart"


def all_jobs(daemon) -> list[dict]:
    return daemon.call("list", limit=1000)["jobs"]


def test_hundred_files_with_slow_writers_and_the_hot_folder_killed(daemon, tmp_path) -> None:
    folder = tmp_path / "hot"
    folder.mkdir()
    hot = HotFolderProcess(daemon, folder).start()
    wait_until(lambda: any(r["event"] == "watching" for r in hot.reports()), 60, "the hot folder to watch")
    prompts = {f"prompt number {i} of a long series" for i in range(100)}
    slow = [f"prompt number {i} of a long series" for i in range(90, 100)]
    for i in range(90):
        drop(folder, f"p{i:03}.txt", f"prompt number {i} of a long series\n{PARAMS}\n")
    started, go_on = [], threading.Event()
    writers = []
    for i, prompt in zip(range(90, 100), slow):
        started.append(threading.Event())
        writers.append(threading.Thread(target=slow_writer, args=(folder / f"p{i:03}.txt", f"{prompt}\n{PARAMS}\n", started[-1], go_on)))
        writers[-1].start()
    for event in started:
        assert event.wait(30)
    wait_until(lambda: len(files_in(folder / "done")) >= 20, 120, "20 files done")
    hot.kill()  # mid-way: some done, some submitted, ten half-written
    hot.start()
    go_on.set()
    for writer in writers:
        writer.join(60)
    wait_until(lambda: len(files_in(folder / "done")) >= 100, 300, "100 files done")
    assert hot.stop() == 0
    assert_exactly_once(folder, prompts, all_jobs(daemon))


def test_the_daemon_killed_and_restarted_mid_way(fresh, tmp_path) -> None:
    fresh.start()
    folder = tmp_path / "hot"
    folder.mkdir()
    hot = HotFolderProcess(fresh, folder).start()
    wait_until(lambda: any(r["event"] == "watching" for r in hot.reports()), 60, "the hot folder to watch")
    prompts = {f"drop {i}" for i in range(60)}
    for i in range(60):
        drop(folder, f"d{i:02}.txt", f"drop {i}\n{PARAMS}\n")
    wait_until(lambda: len(files_in(folder / "done")) >= 10, 120, "10 files done")
    fresh.kill(signal.SIGKILL)
    wait_until(lambda: any(r["event"] == "waiting" for r in hot.reports()), 60, "the hot folder to notice")
    fresh.start()
    wait_until(lambda: len(files_in(folder / "done")) >= 60, 300, "60 files done")
    assert hot.stop() == 0
    assert_exactly_once(folder, prompts, all_jobs(fresh))


def test_malformed_files_fail_with_the_reason_beside_them(daemon, tmp_path) -> None:
    folder = tmp_path / "hot"
    folder.mkdir()
    cases = {
        "unknown.txt": ("a cat\nSteps: 2, Sampler: Euler, Colour: blue\n", "unknown settings: Colour"),
        "value.txt": ("a cat\nSteps: many, Size: 64x64\n", "Steps: 'many'"),
        "size.txt": ("a cat\nSteps: 1, Size: 65x64\n", "width: must be a multiple of 8"),
        "sampler.txt": ("a cat\nSteps: 1, Size: 64x64, Sampler: Heun\n", "unknown scheduler 'Heun'"),
        "empty.txt": ("", "no prompt"),
        "binary.txt": (None, "prompt files are UTF-8 text (or UTF-16 with a byte-order mark)"),
    }
    for name, (text, _) in cases.items():
        if text is None:
            (folder / name).write_bytes(b"caf\xe9 bad")  # Latin-1, no byte-order mark
        else:
            drop(folder, name, text)
    drop(folder, "fine.txt", f"a fine cat\n{PARAMS}\n")
    hot = HotFolderProcess(daemon, folder).start()
    wait_until(lambda: len(files_in(folder / "failed", "*.error.txt")) == len(cases), 120, "the failures")
    wait_until(lambda: files_in(folder / "done") != [], 120, "the good file")
    assert hot.stop() == 0
    for name, (_, reason) in cases.items():
        assert (folder / "failed" / name).exists()
        assert reason in (folder / "failed" / name.replace(".txt", ".error.txt")).read_text(), name
    assert [p.name for p in files_in(folder / "out")] == ["fine.png"]


def test_files_dropped_while_nothing_runs_and_a_late_daemon(fresh, tmp_path) -> None:
    folder = tmp_path / "hot"
    folder.mkdir()
    drop(folder, "early.txt", f"dropped before anything ran\n{PARAMS}\n")
    drop(folder, ".hidden.txt", "not a prompt")
    drop(folder, "draft.txt~", "an editor's backup")
    drop(folder, "notes.md", "not a prompt file")
    hot = HotFolderProcess(fresh, folder).start()
    wait_until(lambda: any(r["event"] == "waiting" for r in hot.reports()), 60, "the hot folder to wait")
    assert files_in(folder / "done") == [] and (folder / "early.txt").exists()
    fresh.start()
    wait_until(lambda: files_in(folder / "done") != [], 120, "the early file")
    drop(folder, "early.txt", f"the same name again\n{PARAMS}\n")  # a new drop: new images, nothing overwritten
    wait_until(lambda: len(files_in(folder / "done")) == 2, 120, "the second drop")
    assert hot.stop() == 0
    assert [p.name for p in files_in(folder / "done")] == ["early-2.txt", "early.txt"]
    assert [p.name for p in files_in(folder / "out")] == ["early-2.png", "early.png"]
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [".hidden.txt", "draft.txt~", "notes.md"]
    kinds = [r["event"] for r in hot.reports()]
    assert kinds.index("waiting") < kinds.index("queued") < kinds.index("done")


@pytest.mark.parametrize("count", [2])
def test_a_file_asking_for_several_images_gets_them_all(daemon, tmp_path, count) -> None:
    folder = tmp_path / "hot"
    folder.mkdir()
    drop(folder, "many.txt", f"several\nNegative prompt: blur\n{PARAMS}, Batch size: {count}\n")
    hot = HotFolderProcess(daemon, folder).start()
    wait_until(lambda: files_in(folder / "done") != [], 120, "the file")
    assert hot.stop() == 0
    images = files_in(folder / "out")
    assert [p.name for p in images] == ["many-2.png", "many.png"]
    assert parse_infotext(read_text(images[0])["parameters"]).negative_prompt == "blur"


def watching(hot: HotFolderProcess, times: int = 1) -> None:
    wait_until(lambda: sum(r["event"] == "watching" for r in hot.reports()) >= times, 60, "the hot folder to watch")


def test_the_job_record_names_the_images_the_file_became(daemon, tmp_path) -> None:
    folder = tmp_path / "hot"
    folder.mkdir()
    (folder / "out").mkdir()
    (folder / "out" / "taken.png").write_bytes(b"someone else's")
    drop(folder, "taken.txt", f"two images\n{PARAMS}, Batch size: 2\n")
    hot = HotFolderProcess(daemon, folder).start()
    wait_until(lambda: files_in(folder / "done") != [], 120, "the file")
    assert hot.stop() == 0
    done = next(r for r in hot.reports() if r["event"] == "done")
    job = daemon.call("get", job=done["job"])["job"]
    assert job["outputs"] == [str(folder.resolve() / "out" / name) for name in ("taken-2.png", "taken-3.png")]
    assert done["images"] == job["outputs"] and all(Path(path).is_file() for path in job["outputs"])
    assert (folder / "out" / "taken.png").read_bytes() == b"someone else's"


def test_a_file_removed_after_it_was_queued_does_not_stop_the_hot_folder(daemon, tmp_path) -> None:
    folder = tmp_path / "hot"
    folder.mkdir()
    hot = HotFolderProcess(daemon, folder).start()
    watching(hot)
    drop(folder, "gone.txt", "removed while its job runs\nSteps: 25, Size: 256x256\n")
    wait_until(lambda: any(r["event"] == "queued" for r in hot.reports()), 60, "the job")
    (folder / "gone.txt").unlink()
    wait_until(lambda: any(r["event"] == "done" for r in hot.reports()), 120, "its job to end")
    assert hot.process.poll() is None, hot.log.read_text()
    assert [r.get("gone") for r in hot.reports() if r["event"] == "done"] == [True]
    assert [p.name for p in files_in(folder / "out")] == ["gone.png"], "its images still come"
    drop(folder, "next.txt", f"the next file\n{PARAMS}\n")
    wait_until(lambda: files_in(folder / "done") != [], 120, "the next file")
    assert hot.stop() == 0
    assert files_in(folder / "failed") == []


@pytest.mark.parametrize("how", ["removed", "moved"])
def test_a_folder_removed_or_moved_away_is_waited_for_and_watched_again(daemon, tmp_path, how) -> None:
    folder = tmp_path / "hot"
    folder.mkdir()
    hot = HotFolderProcess(daemon, folder).start()
    watching(hot)
    if how == "removed":
        shutil.rmtree(folder)
    else:
        folder.rename(tmp_path / "elsewhere")
    wait_until(lambda: any(r["event"] == "folder gone" for r in hot.reports()), 30, "the hot folder to notice")
    assert hot.process.poll() is None, hot.log.read_text()
    folder.mkdir()
    watching(hot, times=2)
    drop(folder, "back.txt", f"a file in the folder that came back\n{PARAMS}\n")
    wait_until(lambda: files_in(folder / "done") != [], 120, "the file")
    assert hot.stop() == 0
    assert [p.name for p in files_in(folder / "out")] == ["back.png"]


def append(path: Path, text: str) -> None:
    with open(path, "a") as file:  # `>>`: open, write, close, every time
        file.write(text)


def test_a_file_appended_to_in_several_writes_becomes_one_job_of_its_whole_text(daemon, tmp_path) -> None:
    folder = tmp_path / "hot"
    folder.mkdir()
    hot = HotFolderProcess(daemon, folder).start()
    watching(hot)
    for part in ("a lighthouse", " at dusk", f"\n{PARAMS}\n"):
        append(folder / "parts.txt", part)
        time.sleep(0.3)  # the writer's own pace, shorter than --settle: not a synchronisation
    wait_until(lambda: files_in(folder / "done") != [], 120, "the file")
    assert hot.stop() == 0
    assert [r["event"] for r in hot.reports()].count("queued") == 1
    images = files_in(folder / "out")
    assert [parse_infotext(read_text(image)["parameters"]).prompt for image in images] == ["a lighthouse at dusk"]


def test_a_file_changed_after_it_was_read_is_read_again_whole(daemon, tmp_path) -> None:
    folder = tmp_path / "hot"
    folder.mkdir()
    hot = HotFolderProcess(daemon, folder).start()
    watching(hot)
    append(folder / "late.txt", "a lighthouse")  # the daemon's defaults: a job of some seconds
    wait_until(lambda: any(r["event"] == "queued" for r in hot.reports()), 60, "the first job")
    append(folder / "late.txt", f" at dusk\n{PARAMS}\n")  # the tail, after the writer paused too long
    wait_until(lambda: files_in(folder / "done") != [], 120, "the file")
    assert hot.stop() == 0
    first, second = [r["job"] for r in hot.reports() if r["event"] == "queued"]
    assert any(r["event"] == "changed" and r["job"] == first for r in hot.reports())
    assert daemon.call("get", job=first)["job"]["state"] == "cancelled"
    assert (folder / "done" / "late.txt").read_text() == f"a lighthouse at dusk\n{PARAMS}\n"
    images = files_in(folder / "out")
    assert [parse_infotext(read_text(image)["parameters"]).prompt for image in images] == ["a lighthouse at dusk"]
    assert daemon.call("get", job=second)["job"]["outputs"] == [str(images[0].resolve())]


def test_a_failing_file_written_in_two_goes_gets_one_reason(daemon, tmp_path) -> None:
    """Once each write was read as a file of its own: `x.error.txt` and `x-2.error.txt`."""
    folder = tmp_path / "hot"
    folder.mkdir()
    hot = HotFolderProcess(daemon, folder).start()
    watching(hot)
    append(folder / "x.txt", "a cat\nSteps: many\n")
    time.sleep(0.3)  # the writer's own pace, shorter than --settle
    append(folder / "x.txt", "Steps: 1, Size: 65x64\n")
    wait_until(lambda: files_in(folder / "failed", "*.error.txt") != [], 60, "the failure")
    drop(folder, "after.txt", f"a file dropped after both writes\n{PARAMS}\n")
    wait_until(lambda: files_in(folder / "done") != [], 120, "the file dropped after")
    assert hot.stop() == 0
    assert [p.name for p in files_in(folder / "failed")] == ["x.error.txt", "x.txt"]
    assert "width: must be a multiple of 8" in (folder / "failed" / "x.error.txt").read_text()
