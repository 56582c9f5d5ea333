"""Denoiser networks: the diffusion prior's Transformer and the decoder/upsampler UNet."""

from unclip.nets.prior_transformer import PriorTransformer
from unclip.nets.unet import UNet

__all__ = ["PriorTransformer", "UNet"]
