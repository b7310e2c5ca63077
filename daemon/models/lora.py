"""LoRA files: what a safetensors LoRA holds, where a named one lives, and what cannot be applied.

A LoRA is read from its safetensors header alone (key names and shapes), so listing a folder of
them or checking a job's costs no tensor loading. Two key formats are applied, by diffusers' own
loaders (below: as adapters by the torch runtime, merged for a Core ML conversion):

* diffusers/PEFT: ``unet.….lora_A.weight`` / ``lora_B`` (and ``text_encoder.``, ``text_encoder_2.``),
  what diffusers' training scripts and ``save_lora_weights`` write;
* kohya (A1111, Civitai): ``lora_unet_…`` / ``lora_te_…`` (SD 1.x/2.x) or ``lora_te1_…`` /
  ``lora_te2_…`` (SDXL) with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``, as
  kohya-ss/sd-scripts networks/lora.py names its modules.

LyCORIS's other network types (LoHa, LoKr, OFT, GLoRA, (IA)³, full diffs) are refused by name.

The hash is A1111's: its ``Lora hashes:`` infotext key carries the first 12 hex digits
(extensions-builtin/Lora/network.py, ``NetworkOnDisk.set_hash``) of the sha256 of the file's
bytes after the safetensors header (modules/hashes.py, ``addnet_hash_safetensors``, after
kohya-ss/sd-scripts' train_util.py), or the ``sshs_model_hash`` kohya wrote into the metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import InvalidParameter
from .family import SD, SDXL, TITLES

SUFFIX = ".safetensors"
DIFFUSERS, KOHYA = "diffusers", "kohya"
UNET, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "text_encoder", "text_encoder_2"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own bound on a header
SHORT_HASH = 12  # hex digits in A1111's `Lora hashes:`

# LyCORIS network types diffusers cannot apply, by a key fragment each of them has.
_LYCORIS = {r"\.hada_w1": "LoHa", r"\.lokr_w1": "LoKr", r"\.oft_(blocks|diag)": "OFT", r"\.diff(_b)?$": "full weight diff",
            r"\.[ab][12]\.weight$": "GLoRA", r"\.on_input$": "(IA)³"}
# kohya's module prefixes (kohya-ss/sd-scripts networks/lora.py, LORA_PREFIX_*), and the part each one trains.
_KOHYA_PREFIXES = (("lora_unet_", UNET), ("lora_te1_", TEXT_ENCODER), ("lora_te2_", TEXT_ENCODER_2),
                   ("lora_te_", TEXT_ENCODER))
# The cross-attention's width (what attn2.to_k takes): SD 1.x's CLIP 768, SD 2.x's OpenCLIP 1024, SDXL's both, 2048.
_CROSS_WIDTHS = {768: SD, 1024: SD, 2048: SDXL}
_TAG = re.compile(r"<lora:([^>]*)>")
HUB_FILE = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)/(?P<file>[^\0]+\.safetensors)$")


@dataclass(frozen=True)
class LoraFile:
    name: str  # what a job calls it: its path in the LoRA folder without .safetensors, or the path given
    path: Path
    format: str  # DIFFUSERS | KOHYA
    family: str | None  # family.SD or family.SDXL; None when neither its names nor its shapes tell
    rank: int  # the largest rank of its layers
    size: int  # bytes
    hash: str  # A1111's short hash (SHORT_HASH hex digits)
    parts: tuple[str, ...]  # what it trains: UNET, TEXT_ENCODER, TEXT_ENCODER_2
    # The safetensors header's __metadata__ (kohya's ss_* training notes), as written: A1111's listing shows it.
    metadata: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> dict[str, object]:
        """The listing's fields (`models` op, `diffuse loras`)."""
        return {"name": self.name, "path": str(self.path), "format": self.format, "family": self.family,
                "rank": self.rank, "size": self.size, "hash": self.hash, "parts": list(self.parts),
                "metadata": dict(self.metadata)}


def _refuse(path: Path, why: str) -> InvalidParameter:
    return InvalidParameter("loras", f"{path}: {why}")


def read_header(path: Path) -> tuple[dict[str, list[int]], dict[str, str], int]:
    """The tensors' shapes by key, the metadata, and the header's length in bytes (8 + JSON)."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > MAX_HEADER:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(file.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise _refuse(path, f"not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise _refuse(path, "not a safetensors file (its header is not a map)")
    metadata = header.pop("__metadata__", None) or {}
    shapes = {key: list(value.get("shape", [])) for key, value in header.items() if isinstance(value, dict)}
    return shapes, metadata, 8 + length


def tensor_hash(path: Path, header_length: int) -> str:
    """sha256 of everything after the safetensors header (A1111's addnet_hash_safetensors), in full."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        file.seek(header_length)
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _part(key: str) -> tuple[str, str] | None:
    """The format and the part a key trains; None for a key of neither format."""
    for prefix, part in _KOHYA_PREFIXES:
        if key.startswith(prefix):
            return KOHYA, part
    head = key.split(".", 1)[0]
    if head in (UNET, TEXT_ENCODER, TEXT_ENCODER_2) and "lora" in key:
        return DIFFUSERS, head
    return None


def _family(shapes: dict[str, list[int]], parts: set[str]) -> str | None:
    """SDXL when it trains a second text encoder or names SDXL's UNet blocks as Stability's code does
    (input_blocks: kohya's SDXL LoRAs); else by the width its cross-attention takes; else SD when
    it trains the (one) text encoder; a UNet-only LoRA of another width: None (the model decides)."""
    if TEXT_ENCODER_2 in parts or any(k.startswith("lora_unet_input_blocks_") for k in shapes):
        return SDXL
    for key, shape in shapes.items():
        if re.search(r"attn2[._]to_k[._](lora_A|lora_down|lora\.down)", key) and len(shape) == 2:
            if shape[1] in _CROSS_WIDTHS:
                return _CROSS_WIDTHS[shape[1]]
    if TEXT_ENCODER in parts:
        return SD  # one text encoder: SDXL LoRAs that train the text train both (kohya: lora_te1_, lora_te2_)
    return None


_CACHE: dict[tuple[Path, int, int], LoraFile] = {}


def inspect(path: Path, name: str | None = None) -> LoraFile:
    """What a LoRA file holds, or InvalidParameter naming the file and why it cannot be applied.
    Cached by path, size and modification time (the hash reads the whole file)."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise _refuse(path, f"cannot be read ({exc.strerror})") from None
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key] if name is None else replace(_CACHE[key], name=name)
    shapes, metadata, header_length = read_header(path)
    for pattern, kind in _LYCORIS.items():
        example = next((k for k in shapes if re.search(pattern, k)), None)
        if example is not None:
            raise _refuse(path, f"a LyCORIS {kind} network (such as {example!r}); only LoRA (LoCon) layers can be applied")
    found = {k: _part(k) for k in shapes}
    unknown = [k for k, v in found.items() if v is None and not k.endswith(".alpha")]
    if not shapes or len(unknown) == len(shapes):
        raise _refuse(path, "holds no LoRA weights in the diffusers/PEFT (unet.…lora_A) or kohya (lora_unet_…) naming "
                      "(a model checkpoint, or another tool's format?)")
    if unknown:
        raise _refuse(path, f"has keys of neither LoRA naming, such as {unknown[0]!r}")
    formats = {v[0] for v in found.values() if v}
    if len(formats) > 1:
        raise _refuse(path, "mixes the diffusers and kohya namings")
    parts = {v[1] for v in found.values() if v}
    ranks = [shape[0] for k, shape in shapes.items() if re.search(r"(lora_A|lora_down|lora\.down)\.weight$", k) and shape]
    if not ranks:
        raise _refuse(path, "has no LoRA down (lora_A / lora_down) weights")
    digest = str(metadata.get("sshs_model_hash") or tensor_hash(path, header_length))
    info = LoraFile(name or path.stem, path, formats.pop(), _family(shapes, parts), max(ranks), stat.st_size,
                    digest[:SHORT_HASH], tuple(p for p in (UNET, TEXT_ENCODER, TEXT_ENCODER_2) if p in parts),
                    {str(k): str(v) for k, v in metadata.items()})
    _CACHE[key] = info
    return info


MAX_LORAS = 8  # LoRAs one job may apply at once
MAX_WEIGHT = 10.0  # a weight's bound either side of 0 (negative weights invert a LoRA, as in A1111)


@dataclass(frozen=True)
class LoraUse:
    """One LoRA of a job: its file, its weight, and whether the prompt named it (A1111's tag) or the job's list."""

    file: LoraFile
    weight: float
    in_prompt: bool


def tag(name: str, weight: float) -> str:
    """A1111's prompt syntax for a LoRA at a weight."""
    return f"<lora:{name}:{weight:g}>"


def prompt_tags(prompt: str) -> list[tuple[str, float]]:
    """The ``<lora:name>`` / ``<lora:name:weight>`` tags of a prompt (A1111's extra-networks syntax;
    the weight defaults to 1.0)."""
    found = []
    for match in _TAG.finditer(prompt):
        name, *weights = match.group(1).split(":")
        if not name.strip() or len(weights) > 1:
            raise InvalidParameter("prompt", f"{match.group(0)}: write <lora:NAME> or <lora:NAME:WEIGHT> "
                                   "(separate text-encoder and UNet weights are not supported)")
        try:
            weight = float(weights[0]) if weights else 1.0
        except ValueError:
            raise InvalidParameter("prompt", f"{match.group(0)}: the weight must be a number, such as 0.8") from None
        found.append((name.strip(), weight))
    return found


def strip_tags(prompt: str) -> str:
    """The prompt's text without its LoRA tags: what the text encoder reads (as A1111 does)."""
    return _TAG.sub("", prompt)


class LoraNotDownloaded(InvalidParameter):
    """A LoRA named as a Hub file that is not in the Hugging Face cache yet: its job downloads it."""

    def __init__(self, name: str, repo: str, file: str) -> None:
        super().__init__("loras", f"{name!r} is not downloaded yet")
        self.repo, self.file = repo, file


def hub_file(name: str) -> tuple[str, str] | None:
    """(repo, file) for a name of the form ORG/REPO/FILE.safetensors (a Hub file); None otherwise."""
    match = HUB_FILE.match(name)
    return (match["repo"], match["file"]) if match else None


def names_a_path(name: str) -> bool:
    """A LoRA name that is a file's path on this machine (``/…``, ``~…``, ``./…``), not a name in the LoRA folder."""
    return name.startswith(("/", "~", "."))


def find(name: str, folder: Path) -> Path:
    """The file a LoRA name means: a path (``/…``, ``~…``, ``./…``) as given; else NAME.safetensors in
    the LoRA folder (subfolders allowed); else, for ORG/REPO/FILE.safetensors, that Hub file in the
    Hugging Face cache (LoraNotDownloaded when it is not there yet)."""
    from . import store

    if names_a_path(name):
        path = Path(name).expanduser()
    else:
        relative = Path(name if name.endswith(SUFFIX) else name + SUFFIX)
        if ".." in relative.parts or relative.is_absolute():
            raise InvalidParameter("loras", f"{name!r}: a name in the LoRA folder may not leave it; give a path instead")
        path = folder / relative
        hub = hub_file(name)
        if not path.is_file() and hub is not None:
            cached = store.cached_file(*hub)
            if cached is None:
                raise LoraNotDownloaded(name, *hub)
            path = cached
    if not path.is_file():
        where = "" if names_a_path(name) else f" in the LoRA folder {folder}"
        raise InvalidParameter("loras", f"no LoRA {name!r}{where}; `diffuse loras` lists them, or give the file's path "
                               "(or a Hub file as ORG/REPO/FILE.safetensors)")
    return path


def listing(folder: Path) -> list[dict[str, object]]:
    """Every LoRA file in the folder, by name; one that cannot be applied is listed with the reason."""
    entries: list[dict[str, object]] = []
    if not folder.is_dir():
        return entries
    for path in sorted(folder.rglob(f"*{SUFFIX}")):
        name = path.relative_to(folder).with_suffix("").as_posix()
        try:
            entries.append(inspect(path, name).describe())
        except InvalidParameter as exc:
            entries.append({"name": name, "path": str(path), "size": path.stat().st_size,
                            "error": str(exc).removeprefix("loras: ")})
    return entries


def _weight(value: object, where: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= MAX_WEIGHT
    if not ok:
        raise InvalidParameter(where, f"a LoRA weight must be a number from {-MAX_WEIGHT:g} to {MAX_WEIGHT:g}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def job_names(prompt: str, listed: tuple[tuple[str, float], ...]) -> list[str]:
    """Every LoRA name a job gives, in its tags and its list."""
    return [name for name, _ in prompt_tags(prompt)] + [name for name, _ in listed]


def job_loras(prompt: str, listed: tuple[tuple[str, float], ...], folder: Path,
              downloads_pending: bool = False) -> tuple[LoraUse, ...]:
    """A job's LoRAs: the prompt's tags, then its list (the order the infotext's prompt names them);
    each file read and checked once. ``downloads_pending``: Hub files not downloaded yet are left
    out (their job downloads them, then checks them) rather than refused."""
    named = [(name, _weight(weight, "prompt"), True) for name, weight in prompt_tags(prompt)]
    named += [(name, _weight(weight, "loras"), False) for name, weight in listed]
    if len(named) > MAX_LORAS:
        raise InvalidParameter("loras", f"at most {MAX_LORAS} LoRAs a job, got {len(named)}")
    uses: list[LoraUse] = []
    for name, weight, in_prompt in named:
        if not isinstance(name, str) or not name:
            raise InvalidParameter("loras", f"each LoRA needs a name, got {name!r}")
        try:
            path = find(name, folder)
        except LoraNotDownloaded:
            if downloads_pending:
                continue
            raise
        info = inspect(path, name)
        twice = next((u for u in uses if u.file.hash == info.hash), None)
        if twice is not None:
            raise InvalidParameter("loras", f"{name!r} is named twice (as {twice.file.name!r} too, the same file); "
                                   "name each LoRA once")
        uses.append(LoraUse(info, weight, in_prompt))
    return tuple(uses)


def check_family(uses: tuple[LoraUse, ...], family: str, model: str) -> None:
    """A LoRA of another family than the model's is refused, naming both."""
    for use in uses:
        if use.file.family is not None and use.file.family != family:
            raise _refuse(use.file.path, f"an {TITLES[use.file.family]} LoRA, and {model} is an {TITLES[family]} model; "
                          f"give an {TITLES[family]} LoRA or an {TITLES[use.file.family]} model")


# Applying LoRAs to diffusers/transformers modules: the torch runtime (per job) and the Core ML
# converter (merged once). torch, diffusers and peft are imported here only when used.


def lora_host(unet: Any, text_encoders: Sequence[Any], sdxl: bool) -> Any:
    """A diffusers pipeline around these very modules (no copies): the object diffusers' LoRA
    methods (lora_state_dict, set_adapters, fuse_lora, delete_adapters, unload_lora_weights) work on.
    ``text_encoders``: SD's one; SDXL's two, or the refiner's second alone."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if sdxl:
        first, second = text_encoders if len(text_encoders) == 2 else (None, text_encoders[0])
        return StableDiffusionXLPipeline(vae=None, unet=unet, scheduler=None, text_encoder=first, text_encoder_2=second,
                                         tokenizer=None, tokenizer_2=None, add_watermarker=False)
    return StableDiffusionPipeline(vae=None, unet=unet, scheduler=None, text_encoder=text_encoders[0], tokenizer=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


class _Unfit(logging.Handler):
    """diffusers' warning that a LoRA's keys found no layer of the model (it only logs it)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "unexpected keys" in record.getMessage():
            self.messages.append(record.getMessage())


def load_adapter(host: Any, name: str, file: LoraFile) -> None:
    """One LoRA file as adapter ``name`` on the UNet and the text encoders it trains; a file whose
    layers do not fit this model is refused, naming it.

    diffusers reads and converts the file (lora_state_dict: kohya's and Stability's names to its
    own) and loads the UNet's part (load_lora_into_unet). The text encoders' parts go in as its
    load_lora_into_text_encoder prepares them, but through PEFT itself (inject_adapter_in_model,
    set_peft_model_state_dict) rather than transformers' load_adapter, which asks for a PEFT
    release newer than any published (transformers 5.24 wants peft 0.22; PyPI's newest is 0.21.2).
    """
    logger = logging.getLogger("diffusers.utils.peft_utils")
    unfit, level, propagate = _Unfit(), logger.level, logger.propagate
    logger.addHandler(unfit)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        with warnings.catch_warnings():  # PEFT's note that a second adapter joins the first: what is meant
            warnings.filterwarnings("ignore", "Already found a `peft_config` attribute")
            state, alphas = host.lora_state_dict(str(file.path), unet_config=host.unet.config)
            host.load_lora_into_unet(state, alphas, unet=host.unet, adapter_name=name, _pipeline=host)
            for prefix in ("text_encoder", "text_encoder_2"):
                encoder = getattr(host, prefix, None)
                if encoder is not None:
                    unfit.messages += _load_text_encoder_adapter(state, alphas, encoder, prefix, name)
    except (ValueError, RuntimeError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise InvalidParameter("loras", f"{file.path}: does not fit this model's layers ({reason})") from None
    finally:
        logger.removeHandler(unfit)
        logger.setLevel(level)
        logger.propagate = propagate
    if unfit.messages:
        raise InvalidParameter("loras", f"{file.path}: some of its layers match no layer of this model "
                               f"({unfit.messages[0][:300]}): a LoRA for another model")


def _load_text_encoder_adapter(state: dict[str, Any], alphas: dict[str, Any] | None, encoder: Any, prefix: str,
                               name: str) -> list[str]:
    """The ``prefix.`` part of a converted LoRA state dict as adapter ``name`` on a text encoder, as
    diffusers' _load_lora_into_text_encoder builds it; the keys that found no layer."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    part = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
    if not part:
        return []
    part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if not hasattr(encoder, "text_model"):  # transformers 5's CLIPTextModel is flat; files name text_model.
        part = {k.removeprefix("text_model."): v for k, v in part.items()}
    ranks = {k: v.shape[1] for k, v in part.items() if k.endswith("lora_B.weight")}
    own = {k.removeprefix(f"{prefix}."): v for k, v in (alphas or {}).items() if k.split(".")[0] == prefix}
    config = _create_lora_config(part, own or None, None, ranks, is_unet=False)
    inject_adapter_in_model(config, encoder, adapter_name=name)
    result = set_peft_model_state_dict(encoder, part, adapter_name=name)
    encoder.to(device=encoder.device, dtype=encoder.dtype)
    return [f"{prefix}: unexpected keys {k}" for k in getattr(result, "unexpected_keys", []) if "lora_" in k][:1]


def merge(unet: Any, text_encoders: Sequence[Any], sdxl: bool, loras: Sequence[tuple[LoraFile, float]]) -> None:
    """Merge LoRAs into these modules' weights for good (diffusers' fuse_lora, then unload_lora_weights,
    which leaves the fused weights): what a conversion to Core ML, which cannot change weights at run
    time, starts from."""
    host = lora_host(unet, text_encoders, sdxl)
    names = [f"lora_{file.hash}" for file, _ in loras]
    for name, (file, _) in zip(names, loras):
        load_adapter(host, name, file)
    host.set_adapters(names, [float(weight) for _, weight in loras])
    host.fuse_lora(adapter_names=names)
    host.unload_lora_weights()
