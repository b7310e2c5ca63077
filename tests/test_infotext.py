"""PNG settings in the infotext format: written, read back, and readable as another tool writes them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffusiond.clients.infotext import Infotext, format_infotext, job_settings, parse_infotext
from diffusiond.daemon.engine.pipeline import Request
from diffusiond.daemon.engine.png import encode_png, infotext, read_parameters, save_result, write_atomic


def test_round_trip_through_a_png(tmp_path, tiny) -> None:
    request = Request(
        'a "quoted" lighthouse, at dusk: oil\non two lines', negative_prompt="blurry, low quality", steps=30,
        guidance_scale=6.5, width=512, height=768, seed=4242, scheduler="dpmpp_2m_karras", rng="torch",
    )
    path = write_atomic(tmp_path / "a.png", encode_png(np.zeros((8, 8, 3), np.uint8), infotext(request, "tiny")))
    parsed = parse_infotext(read_parameters(path))
    settings, unknown = job_settings(parsed)
    assert unknown == []
    assert settings == {
        "prompt": request.prompt, "negative_prompt": request.negative_prompt, "steps": 30,
        "scheduler": "DPM++ 2M Karras", "guidance_scale": 6.5, "seed": 4242, "width": 512, "height": 768,
        "model": "tiny", "rng": "torch",
    }


def test_batches_record_the_position_and_truncation_is_recorded(tmp_path) -> None:
    from diffusiond.daemon.engine.pipeline import Result

    request = Request("p", steps=2, width=64, height=64, seed=1, count=2)
    images = [np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8)]
    paths = save_result(Result(images, request, [False, True], "the dropped tail"), "tiny", tmp_path / "out.png")
    assert [p.name for p in paths] == ["out.png", "out-2.png"]
    second = parse_infotext(read_parameters(paths[1])).params
    assert second["Batch size"] == "2" and second["Batch pos"] == "1"
    assert second["Prompt truncated"] == "the dropped tail"
    assert "NSFW" in second and "NSFW" not in parse_infotext(read_parameters(paths[0])).params
    assert np.asarray(Image.open(paths[1])).min() == 255


def test_reads_what_other_tools_write() -> None:
    text = (
        "masterpiece, a castle\nin the clouds\nNegative prompt: ugly, lowres\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, "
        'Model: v1-5-pruned-emaonly, Lora hashes: "a: 1, b: 2", Version: v1.9.4'
    )
    info = parse_infotext(text)
    assert info.prompt == "masterpiece, a castle\nin the clouds"
    assert info.negative_prompt == "ugly, lowres"
    assert info.params["Lora hashes"] == "a: 1, b: 2"
    settings, unknown = job_settings(info)
    assert settings["scheduler"] == "Euler a" and settings["width"] == 512 and settings["seed"] == 1234
    assert unknown == ["Model hash"]  # Lora hashes is a record: the prompt's <lora:…> tags name the LoRAs


def test_a_plain_prompt_is_only_a_prompt() -> None:
    assert parse_infotext("a cat: sitting, on a mat\n") == Infotext("a cat: sitting, on a mat", "", {})
    assert parse_infotext("Steps: 12").params == {"Steps": "12"}


def test_bad_values_name_the_key() -> None:
    with pytest.raises(ValueError, match="Steps: 'many'"):
        job_settings(parse_infotext("p\nSteps: many, Seed: 1"))
    with pytest.raises(ValueError, match="Size: '512' is not a valid WIDTHxHEIGHT"):
        job_settings(parse_infotext("p\nSize: 512, Seed: 1"))


def test_format_quotes_only_what_needs_it() -> None:
    text = format_infotext(Infotext("p", "", {"Steps": 3, "Model": "a,b"}))
    assert text == 'p\nSteps: 3, Model: "a,b"'
