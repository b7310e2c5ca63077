"""Client-side and service-management commands import only what they use: none of the engine's
libraries, whose import alone took seconds (`diffusiond stop` with no daemon ran 3.7 s, issue 16).

What a command imported is read from the real entry point run in a fresh interpreter, not timed:
a timing would pass or fail with the machine's load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "diffusers", "numpy", "PIL", "huggingface_hub", "safetensors", "coremltools")

_RUN = """
import json, runpy, sys
module, out, *argv = sys.argv[1:]
sys.argv = [module, *argv]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
with open(out, "w") as f:
    json.dump(sorted(sys.modules), f)
"""


def modules_imported(module: str, args: list[str], home: Path) -> set[str]:
    out = home / "modules.json"
    env = {**os.environ, "HOME": str(home), "DIFFUSIOND_RUNTIME_DIR": str(home / "run"),
           "DIFFUSIOND_CONFIG": str(home / "config.toml"), "XDG_STATE_HOME": str(home / "state")}
    done = subprocess.run([sys.executable, "-c", _RUN, module, str(out), *args], capture_output=True, text=True,
                          timeout=120, env=env)
    assert out.exists(), done.stderr
    return {name.split(".")[0] for name in json.loads(out.read_text())}


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("diffusiond.clients.cli", ["--help"]),
        ("diffusiond.clients.cli", ["status"]),  # no daemon: says so
        ("diffusiond.daemon.cli", ["--help"]),
        ("diffusiond.daemon.cli", ["stop"]),  # no daemon: says so
        ("diffusiond.daemon.cli", ["keys", "--client", "laptop"]),
    ],
    ids=["diffuse --help", "diffuse status", "diffusiond --help", "diffusiond stop", "diffusiond keys"],
)
def test_client_and_service_commands_import_none_of_the_engine_libraries(tmp_path, module, args) -> None:
    imported = modules_imported(module, args, tmp_path)
    assert "diffusiond" in imported  # the command did run
    assert sorted(imported & set(HEAVY)) == []
