"""Prompt files as editors save them (a UTF-8 byte-order mark, Windows' UTF-16 "Unicode"), and the
step lines the hot folder prints, with the real daemon and real filesystem events."""

from __future__ import annotations

import codecs

from .test_hotfolder import PARAMS, HotFolderProcess, files_in, wait_until


def test_byte_order_marked_files_are_read_and_the_mark_is_not_in_the_prompt(daemon, tmp_path) -> None:
    folder = tmp_path / "hot"
    folder.mkdir()
    text = f"a café at dusk\n{PARAMS}\n"
    (folder / "bom8.txt").write_bytes(codecs.BOM_UTF8 + text.encode())
    (folder / "utf16le.txt").write_bytes(text.encode("utf-16"))  # with its byte-order mark, as Notepad saves
    (folder / "utf16be.txt").write_bytes(codecs.BOM_UTF16_BE + text.encode("utf-16-be"))
    hot = HotFolderProcess(daemon, folder).start()
    wait_until(lambda: len(files_in(folder / "done")) == 3, 120, "three files done")
    assert hot.stop() == 0
    assert files_in(folder / "failed") == []
    queued = {r["job"] for r in hot.reports() if r["event"] == "queued"}
    prompts = {daemon.call("get", job=job)["job"]["params"]["prompt"] for job in queued}
    assert prompts == {"a café at dusk"}


def test_every_file_gets_its_last_step_line(daemon, tmp_path) -> None:
    folder = tmp_path / "hot"
    folder.mkdir()
    for n in range(3):
        (folder / f"p{n}.txt").write_text(f"a lighthouse {n}\nSteps: 6, Size: 64x64, CFG scale: 1\n")
    hot = HotFolderProcess(daemon, folder).start()
    wait_until(lambda: len(files_in(folder / "done")) == 3, 120, "three files done")
    assert hot.stop() == 0
    last = {r["file"] for r in hot.reports() if r["event"] == "progress" and r["step"] == r["total"] == 6}
    assert last == {"p0.txt", "p1.txt", "p2.txt"}
