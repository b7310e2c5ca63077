"""`diffusiond bench`: time each compute-unit option for a model on this machine, print a table
people can paste into a public benchmark thread, and keep the winner for `auto`.

Each option loads the model afresh (timed apart: the first load compiles for the device), makes
one image to warm up, then times `runs` images; seconds per image include text encoding and
decoding, and it/s is denoising steps over those seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..engine.pipeline import Pipeline, Request
from .hardware import Machine


@dataclass(frozen=True)
class Timing:
    compute_units: str
    load_seconds: float
    seconds_per_image: float
    steps: int

    @property
    def iterations_per_second(self) -> float:
        return self.steps / self.seconds_per_image


def measure(
    open_pipeline: Callable[[str], Pipeline],
    options: list[str],
    request: Request,
    runs: int,
    progress: Callable[[str], None] = print,
) -> list[Timing]:
    """Time `runs` images of `request` for each option; the fastest first."""
    timings = []
    for units in options:
        progress(f"{units}: loading …")
        started = time.perf_counter()
        pipeline = open_pipeline(units)
        loaded = time.perf_counter() - started
        progress(f"{units}: loaded in {loaded:.1f}s; warming up …")
        pipeline.generate(request)
        started = time.perf_counter()
        for _ in range(runs):
            pipeline.generate(request)
        timing = Timing(units, loaded, (time.perf_counter() - started) / runs, request.steps)
        progress(f"{units}: {timing.seconds_per_image:.2f} s/image")
        timings.append(timing)
    return sorted(timings, key=lambda t: t.seconds_per_image)


def table(machine: Machine, model: str, timings: list[Timing]) -> str:
    """A Markdown table: one row per compute-unit option, the machine's facts on every row."""
    rows = [
        "| Chip | Cores (P+E) | Memory | OS | Model | Compute units | Steps | s/image | it/s | Load (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in timings:
        rows.append(
            f"| {machine.chip} | {machine.performance_cores}+{machine.efficiency_cores} | {machine.memory_gb} GB | "
            f"{machine.os} | {model} | {t.compute_units} | {t.steps} | {t.seconds_per_image:.2f} | "
            f"{t.iterations_per_second:.2f} | {t.load_seconds:.1f} |"
        )
    return "\n".join(rows)
