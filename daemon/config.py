"""The daemon's settings: a TOML file with the defaults (model, folders, runtime, limits).

Everything has a default, so no file is needed; a file with an unknown key or a value of the
wrong type is refused at start with the key named, rather than half-applied.
"""

from __future__ import annotations

import os
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from diffusiond.clients.protocol import COMPUTE_UNIT_CHOICES, default_runtime_dir



def _home(*parts: str) -> Path:
    return Path.home().joinpath(*parts)


def default_config_path() -> Path:
    override = os.environ.get("DIFFUSIOND_CONFIG")
    if override:
        return Path(override)
    if sys.platform == "darwin":
        return _home("Library", "Application Support", "diffusiond", "config.toml")
    return Path(os.environ.get("XDG_CONFIG_HOME") or _home(".config")) / "diffusiond" / "config.toml"


def _default_state_dir() -> Path:
    if sys.platform == "darwin":
        return _home("Library", "Application Support", "diffusiond")
    return Path(os.environ.get("XDG_STATE_HOME") or _home(".local", "state")) / "diffusiond"


def default_lora_dir() -> Path:
    """LoRA files by name: under the user's data folder (XDG_DATA_HOME on Linux), beside the state on a Mac."""
    if sys.platform == "darwin":
        return _home("Library", "Application Support", "diffusiond", "loras")
    return Path(os.environ.get("XDG_DATA_HOME") or _home(".local", "share")) / "diffusiond" / "loras"


MIN_SIZE = 64  # the smallest width or height; Limits.size is the largest
# Seconds a stop waits for the worker to reach a point between model calls; a call that runs
# longer (one step of a huge image on the CPU) is abandoned and its job queued again. Here, not in
# the server, so that `diffusiond stop` can say it without importing the server.
STOP_GRACE = 5.0


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (docs/engine.md); the config may lower them; the engine enforces them."""

    prompt_chars: int = 4000
    steps: int = 150
    size: int = 2048
    count: int = 16
    guidance: float = 50.0


@dataclass(frozen=True)
class Config:
    model: str = "shapes"  # loaded at start and kept warm
    runtime: str = "torch"
    device: str = "auto"
    compute_units: str = "auto"  # coreml: one of protocol.COMPUTE_UNIT_CHOICES
    # The torch runtime on a GPU (docs/gpu.md); "auto": on for CUDA, off elsewhere.
    precision: str = "auto"  # auto | fp16 | bf16 | fp32 (auto: fp16 on a GPU, fp32 on the CPU)
    compile: str = "auto"  # auto | on | off: torch.compile the UNet and VAE decoder at load
    cuda_graphs: str = "auto"  # auto | on | off: each denoising step one CUDA graph replay
    channels_last: str = "auto"  # auto | on | off
    device_loop: str = "auto"  # auto | on | off: the denoising loop on the device, no host sync
    output_dir: Path = field(default_factory=lambda: _home("Pictures", "diffusiond"))
    state_dir: Path = field(default_factory=_default_state_dir)  # the SQLite queue
    runtime_dir: Path = field(default_factory=default_runtime_dir)  # the ipc sockets
    lora_dir: Path = field(default_factory=default_lora_dir)  # LoRA files a job names as NAME (docs/models.md)
    max_queued: int = 10_000  # submits beyond this many queued jobs get `queue_full`
    keep_archives: bool = False  # keep a Core ML repo's zip in the HF cache after it is unpacked (twice the disk)
    max_loaded: int = 1  # models kept warm at once; loading another unloads the least recently used
    idle_unload: float = 0.0  # seconds unused before a model is unloaded; 0: never
    tcp: str = ""  # "HOST:PORT": also listen on TCP (events on PORT + 1, workers on PORT + 2), CurveZMQ keys only
    local_worker: bool = True  # false: this machine keeps the queue and remote workers run the jobs
    worker_timeout: float = 10.0  # seconds of silence after which a remote worker is lost and its job requeued
    limits: Limits = field(default_factory=Limits)

    @property
    def database(self) -> Path:
        return self.state_dir / "queue.sqlite3"

    @property
    def keys_dir(self) -> Path:
        """The server's key pair, and allowed/ with the public keys of the clients it accepts."""
        return self.state_dir / "keys"


_SWITCH = ("auto", "on", "off")
# The torch runtime's settings and their values: the config's keys, checked here at load and by
# TorchSettings (engine/runtimes/torch_runtime.py) wherever a command line builds its own.
TORCH_SETTINGS = {
    "precision": ("auto", "fp16", "bf16", "fp32"), "compile": _SWITCH, "cuda_graphs": _SWITCH,
    "channels_last": _SWITCH, "device_loop": _SWITCH,
}
_CHOICES = {"runtime": ("torch", "coreml"), "compute_units": COMPUTE_UNIT_CHOICES, **TORCH_SETTINGS}


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _typed(key: str, value: Any, kind: type) -> Any:
    if kind is Path:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a path string, got {value!r}")
        return Path(value).expanduser()
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{key} must be {kind.__name__}, got {value!r}")
    return value


def load(path: Path | None = None) -> Config:
    """The config at ``path`` (default: the platform's usual place); missing file → all defaults."""
    path = path or default_config_path()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return Config()
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read config {path}: {exc}") from None
    kinds = {f.name: str(f.type) for f in fields(Config)}  # annotations are strings here
    types = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in kinds:
            raise ValueError(f"config {path}: unknown key {key!r}; known: {', '.join(kinds)}")
        if kinds[key] == "Limits":
            if not isinstance(value, dict):
                raise ValueError(f"config {path}: [limits] must be a table")
            limit_kinds = {f.name: str(f.type) for f in fields(Limits)}
            unknown = set(value) - set(limit_kinds)
            if unknown:
                raise ValueError(f"config {path}: unknown limits {sorted(unknown)}; known: {', '.join(limit_kinds)}")
            limits = {k: _typed(f"limits.{k}", v, types[limit_kinds[k]]) for k, v in value.items()}
            ceiling = Limits()
            for name, limit in limits.items():
                # The built-in limits are what the engine is tested and sized for: a config lowers them.
                most, least = getattr(ceiling, name), {"guidance": 0, "size": MIN_SIZE}.get(name, 1)
                if not least <= limit <= most:
                    raise ValueError(f"config {path}: limits.{name} must be from {least} to {most}; got {limit}")
            values[key] = Limits(**limits)
        else:
            values[key] = _typed(key, value, types[kinds[key]])
    try:
        for key, allowed in _CHOICES.items():
            if key in values:
                check_choice(key, values[key], allowed)
    except ValueError as exc:
        raise ValueError(f"config {path}: {exc}") from None
    config = Config(**values)
    if not config.local_worker and not config.tcp:
        raise ValueError(f"config {path}: local_worker = false needs tcp: no remote worker could reach this daemon")
    return config
