"""Hardware facts that choose Core ML compute units: a pure rule (coreml_layout) over these."""

from __future__ import annotations

import os
import platform
import subprocess
import sys


def _sysctl(name: str) -> int | None:
    try:
        return int(subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def hardware_facts() -> tuple[bool, int]:
    """(has a Neural Engine, performance cores). Every Apple silicon Mac has a Neural Engine."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return True, _sysctl("hw.perflevel0.physicalcpu") or _sysctl("hw.physicalcpu") or 0
    return False, os.cpu_count() or 0
