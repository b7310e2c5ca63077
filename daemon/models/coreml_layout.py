"""Apple's Core ML repo layouts, the one variant a Mac needs of them, and safe unpacking.

Apple and Diffusers for Mac publish the same models several ways: `original/compiled/` and
`split_einsum/compiled/` folders (`split_einsum_v2` for newer chips), `…/packages/` with
.mlpackage sources, and zip archives of any of these (`REPO_original_compiled.zip`), some nesting
`compiled/` and `packages/` inside. The attention variant follows the compute units: the GPU runs
`original` best, the Neural Engine `split_einsum(_v2)`.
"""

from __future__ import annotations

import re
import stat
import zipfile
from pathlib import Path

_VARIANTS = ("original", "split_einsum_v2", "split_einsum")
_FOLDER = re.compile(r"^(original|split_einsum_v2|split_einsum)/(compiled|packages)/")
_ZIP = re.compile(r"(?:^|_)(original|split_einsum_v2|split_einsum)_(compiled|packages)\.zip$")
_SHARED = ("vocab.json", "merges.txt", "model_index.json")
MAX_UNPACKED_BYTES = 32 * 1024**3
MAX_ENTRIES = 100_000


class UnsafeArchive(ValueError):
    code = "unsafe_archive"


def auto_compute_units(has_neural_engine: bool, performance_cores: int) -> str:
    """Diffusers for Mac's rule: no Neural Engine → GPU; 8 or more performance cores → GPU; else ANE."""
    if not has_neural_engine or performance_cores >= 8:
        return "cpuAndGPU"
    return "cpuAndNeuralEngine"


def _preference(compute_units: str) -> tuple[str, ...]:
    if compute_units in ("cpuAndNeuralEngine", "all"):
        return ("split_einsum_v2", "split_einsum", "original")
    return ("original", "split_einsum", "split_einsum_v2")


def is_coreml_repo(files: list[str]) -> bool:
    return any(_FOLDER.match(f) or _ZIP.search(f) for f in files)


def coreml_files(files: list[str], compute_units: str) -> tuple[str, list[str]]:
    """The variant chosen and the files to download for it: its compiled models (a folder, else
    an archive), else its packages; plus the tokenizer files at the top."""
    offered: dict[tuple[str, str], list[str]] = {}
    for f in files:
        folder, archive = _FOLDER.match(f), _ZIP.search(f)
        match = folder or archive
        if match:
            offered.setdefault((match.group(1), match.group(2)), []).append(f)
    for variant in _preference(compute_units):
        for kind in ("compiled", "packages"):
            chosen = offered.get((variant, kind))
            if chosen:
                # A folder's files beat an archive of the same thing.
                folder_files = [f for f in chosen if _FOLDER.match(f)]
                return variant, sorted((folder_files or chosen) + [f for f in files if f in _SHARED])
    raise ValueError("no Core ML models in this repo's known layouts")


def unpack(archive: Path, destination: Path) -> Path:
    """Extract a zip with no entry escaping `destination`, no links, and a bounded size."""
    destination = destination.resolve()
    with zipfile.ZipFile(archive) as zf:
        entries = zf.infolist()
        if len(entries) > MAX_ENTRIES:
            raise UnsafeArchive(f"{archive.name} has {len(entries)} entries; at most {MAX_ENTRIES}")
        if sum(e.file_size for e in entries) > MAX_UNPACKED_BYTES:
            raise UnsafeArchive(f"{archive.name} unpacks to more than {MAX_UNPACKED_BYTES // 1024**3} GB")
        for entry in entries:
            target = (destination / entry.filename).resolve()
            if not target.is_relative_to(destination) or Path(entry.filename).is_absolute():
                raise UnsafeArchive(f"{archive.name}: entry {entry.filename!r} would land outside the folder")
            if stat.S_ISLNK(entry.external_attr >> 16):
                raise UnsafeArchive(f"{archive.name}: entry {entry.filename!r} is a link")
        destination.mkdir(parents=True, exist_ok=True)
        zf.extractall(destination)
    return destination


# Compiled models are named TextEncoder.mlmodelc …; packages Stable_Diffusion_version_…_text_encoder.mlpackage.
# An SDXL refiner alone has only the second text encoder (TextEncoder2, …_text_encoder_2).
_NAMING = ((("TextEncoder.mlmodelc", "TextEncoder2.mlmodelc"), ("Unet.mlmodelc", "UnetChunk1.mlmodelc")),
           (("*_text_encoder.mlpackage", "*_text_encoder_2.mlpackage"), ("*_unet.mlpackage", "*_unet_chunk1.mlpackage")))


def model_dir(root: Path) -> Path:
    """The folder under `root` holding the models in Apple's naming (compiled preferred), however deep
    an archive nests it (Apple's SDXL archives: NAME_original_compiled/compiled/)."""
    for text_encoders, unets in _NAMING:
        found = sorted((p for pattern in text_encoders for p in root.rglob(pattern)), key=lambda p: len(p.parts))
        for encoder in found:
            if any(next(encoder.parent.glob(unet), None) for unet in unets):
                return encoder.parent
    raise FileNotFoundError(f"no TextEncoder and Unet models in Apple's naming under {root}")
