"""The "infotext" settings format that PNGs carry in their ``parameters`` text chunk.

It is the de-facto format of Stable Diffusion tools (AUTOMATIC1111 and the many readers built
for it): prompt line(s), an optional ``Negative prompt:`` line, then one line of ``Key: value``
pairs. Writing it lets other tools read our images; parsing it lets a client reuse an earlier
image's settings and lets a hot-folder prompt file say everything a job needs.
Standard library only: clients import it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

NEGATIVE = "Negative prompt:"
# One `Key: value` pair; a value with a comma, colon or quote is written JSON-quoted.
_PAIR = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')

# Infotext key -> job field, and how its text becomes the field's value.
_KEYS: dict[str, tuple[str, type]] = {
    "Steps": ("steps", int),
    "Sampler": ("scheduler", str),
    "CFG scale": ("guidance_scale", float),
    "Seed": ("seed", int),
    "Size": ("size", str),
    "Model": ("model", str),
    "RNG": ("rng", str),
    "Denoising strength": ("strength", float),
    "Batch size": ("count", int),
    "Refiner": ("refiner", str),
    "Refiner switch at": ("refiner_switch", float),
}
# Written for the record, not settings a new job takes.
# `Lora hashes`: the prompt's <lora:…> tags name the LoRAs; the hashes say which files they were.
_RECORD_ONLY = {"Batch pos", "Version", "Prompt truncated", "Safety checker", "NSFW", "Lora hashes"}


@dataclass
class Infotext:
    prompt: str
    negative_prompt: str = ""
    params: dict[str, str] = field(default_factory=dict)


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def format_infotext(info: Infotext) -> str:
    lines = [info.prompt]
    if info.negative_prompt:
        lines.append(f"{NEGATIVE} {info.negative_prompt}")
    if info.params:
        lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in info.params.items()))
    return "\n".join(lines)


def _parse_params(line: str) -> dict[str, str] | None:
    """The pairs of a parameters line, or None when the line is not one (then it is prompt text)."""
    params: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        match = _PAIR.match(line, pos)
        if not match or match.end() == pos:
            return None
        key, value = match.group(1).strip(), match.group(2).strip()
        params[key] = json.loads(value) if value.startswith('"') else value
        pos = match.end()
    # Like other tools: a line of pairs is settings when it names a known key or has three pairs
    # ("a cat: sitting" stays a prompt; "Steps: 20, Stepz: 3" is settings, with a bad key).
    known = set(_KEYS) | _RECORD_ONLY
    return params if any(key in known for key in params) or len(params) >= 3 else None


def parse_infotext(text: str) -> Infotext:
    lines = text.strip("\n").split("\n")
    params = _parse_params(lines[-1].strip()) if lines else None
    if params is not None:
        lines = lines[:-1]
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith(NEGATIVE):
            in_negative = True
            line = line[len(NEGATIVE) :].strip()
        (negative if in_negative else prompt).append(line)
    return Infotext("\n".join(prompt).strip(), "\n".join(negative).strip(), params or {})


def parse_size(text: str) -> tuple[int, int]:
    """"512x768" → (512, 768); ValueError otherwise."""
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def job_settings(info: Infotext) -> tuple[dict[str, Any], list[str]]:
    """Job fields named by an infotext, and the keys it carries that no job field takes.

    Raises ValueError naming the key when a value does not parse.
    """
    settings: dict[str, object] = {"prompt": info.prompt}
    if info.negative_prompt:
        settings["negative_prompt"] = info.negative_prompt
    unknown = []
    for key, value in info.params.items():
        if key in _RECORD_ONLY:
            continue
        if key not in _KEYS:
            unknown.append(key)
            continue
        name, kind = _KEYS[key]
        try:
            if name == "size":
                settings["width"], settings["height"] = parse_size(value)
            else:
                settings[name] = kind(value)
        except ValueError:
            raise ValueError(f"{key}: {value!r} is not a valid {kind.__name__ if name != 'size' else 'WIDTHxHEIGHT'}") from None
    return settings, unknown
