"""The warm-model policy: at most N models loaded (least recently used goes first), idle unload."""

from __future__ import annotations

import shutil

from diffusiond.clients.protocol import Event
from diffusiond.daemon.models.catalog import TINY

from .daemon_process import Daemon

FAST = {"steps": 1, "width": 64, "height": 64, "guidance_scale": 1.0}


def test_loading_a_second_model_unloads_the_least_recently_used(tmp_path) -> None:
    other = tmp_path / "other-model"
    shutil.copytree(TINY, other)
    daemon = Daemon(tmp_path / "d", max_loaded=1).start()
    try:
        events = daemon.subscribe(b"model.", b"job.")
        job = daemon.call("submit", prompt="other", model=str(other), **FAST)["job"]["id"]
        seen = []
        while not seen or seen[-1]["type"] != Event.JOB_DONE:
            seen.append(daemon.next_event(events, 120)[1])
        models = [(e["type"], e.get("model")) for e in seen if e["type"].startswith("model.")]
        assert models == [(Event.MODEL_UNLOADED, "tiny"), (Event.MODEL_LOADING, str(other)), (Event.MODEL_LOADED, str(other))]
        assert next(e for e in seen if e["type"] == Event.MODEL_UNLOADED)["reason"] == "least recently used"
        kinds = [e["type"] for e in seen]
        assert kinds.index(Event.JOB_STARTED) < kinds.index(Event.MODEL_LOADING) < kinds.index(Event.JOB_PROGRESS)
        assert daemon.call("ping")["models"]["loaded"] == [str(other)]
        assert daemon.wait_job(job)["state"] == "done"
    finally:
        daemon.close()


def test_two_models_stay_warm_when_two_are_allowed(tmp_path) -> None:
    other = tmp_path / "other-model"
    shutil.copytree(TINY, other)
    daemon = Daemon(tmp_path / "d", max_loaded=2).start()
    try:
        daemon.wait_job(daemon.call("submit", prompt="other", model=str(other), **FAST)["job"]["id"])
        assert daemon.call("ping")["models"]["loaded"] == ["tiny", str(other)]
    finally:
        daemon.close()


def test_an_idle_model_is_unloaded_and_a_job_loads_it_again(tmp_path) -> None:
    daemon = Daemon(tmp_path / "d", idle_unload=1.0).start()
    try:
        events = daemon.subscribe(b"model.")
        unloaded = daemon.wait_for(events, lambda e: e["type"] == Event.MODEL_UNLOADED, 30)
        assert unloaded["model"] == "tiny" and unloaded["reason"] == "idle for 1s"
        assert daemon.call("ping")["models"]["loaded"] == []
        job = daemon.call("submit", prompt="wake up", **FAST)["job"]["id"]
        assert daemon.wait_for(events, lambda e: e["type"] == Event.MODEL_LOADED, 60)["model"] == "tiny"
        assert daemon.wait_job(job)["state"] == "done"
    finally:
        daemon.close()
