"""Model families. They share the one pipeline and differ in what the text encoding returns and
what the UNet takes (docs/engine.md, Model families)."""

SD = "sd"  # Stable Diffusion 1.x/2.x (SD-Turbo too): one CLIP text encoder, its last hidden states
SDXL = "sdxl"  # two text encoders, the pooled projection and size conditioning (base, Turbo, Lightning)
SDXL_REFINER = "sdxl-refiner"  # the second text encoder only and aesthetic-score conditioning; refines images

TITLES = {SD: "SD 1.x/2.x", SDXL: "SDXL", SDXL_REFINER: "SDXL refiner"}
