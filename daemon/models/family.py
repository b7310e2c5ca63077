"""Model families. They share the one pipeline and differ in what the text encoding returns and
what the UNet takes (docs/engine.md, Model families)."""

SD = "sd"  # Stable Diffusion 1.x/2.x (SD-Turbo too): one CLIP text encoder, its last hidden states
SDXL = "sdxl"  # two text encoders, the pooled projection and size conditioning (base, Turbo, Lightning)
SDXL_REFINER = "sdxl-refiner"  # the second text encoder only and aesthetic-score conditioning; refines images

TITLES = {SD: "SD 1.x/2.x", SDXL: "SDXL", SDXL_REFINER: "SDXL refiner"}

# SDXL's last text encoder (OpenCLIP ViT-bigG) was trained padding with "!" (id 0: open_clip's
# tokenizer in Stability's generative-models; tokenizer_2/special_tokens_map.json in
# stabilityai/stable-diffusion-xl-base-1.0), its first with <|endoftext|>. Apple's Core ML repos ship
# one vocabulary for both, and their Swift pipeline pads both with <|endoftext|>; the family decides,
# so a prompt encodes the same on every runtime and layout.
LAST_ENCODER_PAD = "!"


def pad_tokens(family: str, encoders: int) -> tuple[str | None, ...]:
    """Each text encoder's padding token, in order; None keeps the tokenizer's own."""
    if family == SD:
        return (None,) * encoders
    return (None,) * (encoders - 1) + (LAST_ENCODER_PAD,)
