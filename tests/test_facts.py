"""A model's own default guidance (diffusiond.json): what a request that names none runs at."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from diffusiond.clients.infotext import parse_infotext
from diffusiond.daemon.config import Limits
from diffusiond.daemon.engine.png import read_parameters
from diffusiond.daemon.engine.pipeline import Request, resolve
from diffusiond.daemon.errors import InvalidParameter, ModelInvalid
from diffusiond.daemon.models.catalog import TINY
from diffusiond.daemon.models.diffusers_folder import ModelFolder

from .daemon_process import Daemon


def tiny_saying(folder: Path, facts: str) -> Path:
    """The tiny model with `facts` as its diffusiond.json."""
    shutil.copytree(TINY, folder)
    (folder / "diffusiond.json").write_text(facts)
    return folder


def test_a_request_without_guidance_gets_the_models_own_and_one_with_it_keeps_its_own(tmp_path) -> None:
    model = ModelFolder.open(str(tiny_saying(tmp_path / "m", json.dumps({"default_guidance_scale": 2.5}))))
    assert resolve(Request("a red circle"), model).guidance_scale == 2.5
    assert resolve(Request("a red circle", guidance_scale=6), model).guidance_scale == 6
    assert resolve(Request("a red circle", guidance_scale=0), model).guidance_scale == 0
    assert resolve(Request("a red circle"), ModelFolder.open("tiny")).guidance_scale == 7.5  # no diffusiond.json


@pytest.mark.parametrize("facts", ['{"default_guidance_scale": "high"}', '{"default_guidance_scale": -1}',
                                   '{"default_guidance_scale": true}', '{"default_guidance_scale": 51}',
                                   '{"default_guidance_scale": NaN}', '{"default_guidance_scale": 3', '[3]'])
def test_an_unusable_default_refuses_the_model_naming_the_file(tmp_path, facts) -> None:
    model = ModelFolder.open(str(tiny_saying(tmp_path / "m", facts)))
    with pytest.raises(ModelInvalid, match="diffusiond.json") as info:
        resolve(Request("a red circle"), model)
    assert info.value.code == "model_invalid"


def test_a_default_above_the_daemons_limit_is_refused_saying_to_give_one(tmp_path) -> None:
    model = ModelFolder.open(str(tiny_saying(tmp_path / "m", json.dumps({"default_guidance_scale": 9}))))
    with pytest.raises(InvalidParameter, match="default of 9 is above this daemon's limit of 8; give a guidance_scale"):
        resolve(Request("a red circle"), model, Limits(guidance=8))
    assert resolve(Request("a red circle", guidance_scale=4), model, Limits(guidance=8)).guidance_scale == 4


def test_the_daemon_runs_and_records_the_models_guidance(tmp_path) -> None:
    model = tiny_saying(tmp_path / "m", json.dumps({"default_guidance_scale": 2.5}))
    with Daemon(tmp_path / "home", model=str(model)) as daemon:
        fast = {"prompt": "a red circle", "steps": 1, "width": 64, "height": 64}
        quiet = daemon.call("submit", **fast)["job"]
        loud = daemon.call("submit", **fast, guidance_scale=6.0)["job"]
        assert (quiet["params"]["guidance_scale"], loud["params"]["guidance_scale"]) == (2.5, 6.0)
        for job, cfg in ((quiet, "2.5"), (loud, "6.0")):
            done = daemon.wait_job(job["id"])
            assert done["state"] == "done", done
            assert parse_infotext(read_parameters(done["outputs"][0])).params["CFG scale"] == cfg
