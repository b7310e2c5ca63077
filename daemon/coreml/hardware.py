"""Hardware facts that choose Core ML compute units (a pure rule in coreml_layout over these), the
machine a bench result belongs to, and whether the torch runtime would find a GPU."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# What `sysctl -n` is asked for; parse_sysctl reads the answers.
SYSCTL_NAMES = ("machdep.cpu.brand_string", "hw.perflevel0.physicalcpu", "hw.perflevel1.physicalcpu",
                "hw.physicalcpu", "hw.memsize", "hw.optional.arm64")
PALETTIZED_MACOS = 14


@dataclass(frozen=True)
class Machine:
    chip: str
    performance_cores: int
    efficiency_cores: int
    memory_gb: int
    os: str
    has_neural_engine: bool

    @property
    def runs_palettized(self) -> bool:
        """Core ML's palettized weights need macOS 14 (Diffusers for Mac hides such models below it)."""
        if not self.os.startswith("macOS "):
            return True  # not a Mac: the Core ML runtime refuses anything, for that reason
        major = self.os.removeprefix("macOS ").split(".")[0]
        return not major.isdigit() or int(major) >= PALETTIZED_MACOS

    @property
    def key(self) -> str:
        """One machine kind for the bench store: chip, cores and memory (what changes the winner)."""
        return f"{self.chip}, {self.performance_cores}P+{self.efficiency_cores}E, {self.memory_gb} GB"


def parse_sysctl(values: dict[str, str], os_version: str) -> Machine:
    """The machine from sysctl's answers (missing names: Intel Macs lack the perflevel ones)."""

    def number(name: str) -> int:
        try:
            return int(values.get(name, "").strip())
        except ValueError:
            return 0

    performance = number("hw.perflevel0.physicalcpu") or number("hw.physicalcpu")
    return Machine(
        chip=values.get("machdep.cpu.brand_string", "").strip() or platform.processor() or "unknown",
        performance_cores=performance,
        efficiency_cores=number("hw.perflevel1.physicalcpu"),
        memory_gb=round(number("hw.memsize") / 1024**3),
        os=os_version,
        has_neural_engine=number("hw.optional.arm64") == 1,  # every Apple silicon Mac has one
    )


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def this_machine() -> Machine:
    if sys.platform == "darwin":
        return parse_sysctl({name: _sysctl(name) for name in SYSCTL_NAMES}, f"macOS {platform.mac_ver()[0]}")
    return Machine(platform.processor() or platform.machine(), os.cpu_count() or 0, 0,
                   round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3),
                   f"{platform.system()} {platform.release()}", False)


def has_gpu(device: str) -> bool:
    """Whether the torch runtime would run on a GPU (a pull then fetches the fp16 weights), told
    without importing torch, which takes seconds and which a Mac running Core ML models may lack:
    an explicit device says; `auto` finds Apple silicon (MPS) or an NVIDIA or ROCm driver, as
    torch_runtime.pick_device would (given a torch built for that GPU)."""
    if device != "auto":
        return not device.startswith("cpu")
    if sys.platform == "darwin":
        return platform.machine() == "arm64"
    return any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidia0", "/dev/kfd"))
