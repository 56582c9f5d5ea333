"""unclip: hierarchical text-conditional image generation with CLIP latents (DALL-E 2), in Lightning + Hydra."""

__version__ = "0.1.0"
