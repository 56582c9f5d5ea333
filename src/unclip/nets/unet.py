"""The unCLIP decoder and upsampler denoiser: an ADM / GLIDE UNet conditioned on CLIP image embeddings.

One class serves both stages (Ramesh et al. 2022):
- decoder (section 2.1): "projecting and adding CLIP embeddings to the existing timestep embedding, and
  projecting CLIP embeddings into four extra tokens of context that are concatenated to the sequence of
  outputs from the GLIDE text encoder"; the attention layers attend to that context (GLIDE, Nichol et al.
  2021, section 2.3). Build it with `image_embed_dim`, `text_token_dim` and `attention_resolutions`.
  `coord_channels` adds each pixel's coordinates to the input, so captions that say where things are can be
  followed from the first layer on; `text_pool` also adds the caption's mean token state to the
  conditioning embedding (GLIDE adds its final token's there, section 2.3), a direct global path for what
  the caption says, next to attention; `position_embedding` adds a learned map per input feature (the
  net then runs at its training size only); `image_embed_map` r also projects the image embedding to an
  r x r map of features added at the first level, as a generator's first layer turns its latent into a
  coarse layout (DCGAN, Radford et al. 2016): what is drawn where, before any convolution has to place it;
  `text_encoder_layers` n runs n bidirectional Transformer layers over the projected caption tokens, trained
  with the UNet, as GLIDE's own text encoder is (its outputs are the context unCLIP's decoder attends to).
- upsamplers (section 2.1, appendix C): no text, no attention; the low-resolution image is resized to the
  output size and concatenated to x_t on channels (`lowres_cond`), and the level of the noise that
  corrupted it in training is embedded like a timestep (`noise_level_cond`, Ho et al. 2021, "Cascaded
  Diffusion Models", section 4.1).

The backbone is ADM's (Dhariwal & Nichol 2021, section 3): residual blocks with scale-shift conditioning
(`h = norm(h) * (1 + scale) + shift`), up/down-sampling inside residual blocks, multi-head attention at the
chosen resolutions, and zero-initialised residual outputs, attention projections and final conv, so the
freshly built net predicts exactly zero.

Context tokens live at width `context_dim = 4 * model_channels` (the conditioning embedding's width):
caption tokens (L of them) projected from `text_token_dim`, then `num_image_tokens` tokens projected from
the image embedding, then one shared LayerNorm; every attention layer has its own key/value projection of
them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unclip.nets.layers import Attention, TimestepEmbedding, TransformerBlock, group_norm, init_config, zero_module


def conv_memory_format(device: torch.device | str) -> torch.memory_format:
    """The layout a UNet's images and conv weights take on `device`: channels_last (NHWC) on a GPU, where cuDNN's
    bf16/TF32 convolutions run in it; NCHW on the CPU, where oneDNN ran the demo decoder's training step 10%
    faster in NCHW on an AVX2 machine (docs/PERFORMANCE.md, "Memory layout on the CPU")."""
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


def resize_lowres(lowres_image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The upsampler's conditioning image at the output size (bilinear, as ADM's super-resolution model);
    returned unchanged when it already has that size. The one place this resize is defined, so training
    code that prepares the conditioning itself matches what the net does."""
    if tuple(lowres_image.shape[-2:]) == tuple(size):
        return lowres_image
    return F.interpolate(lowres_image, size=size, mode="bilinear", align_corners=False)  # (B, C, *size)


def coordinate_channels(x: torch.Tensor) -> torch.Tensor:
    """Two channels holding each pixel's row and column in [-1, 1] (CoordConv, Liu et al. 2018), for x
    (B, C, H, W) -> (B, 2, H, W): convolutions alone see absolute position only through the border, and a
    caption's "top left" asks for exactly that."""
    B, _, H, W = x.shape
    rows = torch.linspace(-1.0, 1.0, H, device=x.device, dtype=x.dtype).view(1, 1, H, 1).expand(B, 1, H, W)
    cols = torch.linspace(-1.0, 1.0, W, device=x.device, dtype=x.dtype).view(1, 1, 1, W).expand(B, 1, H, W)
    return torch.cat([rows, cols], dim=1)


class ResBlock(nn.Module):
    """ADM residual block: GroupNorm -> SiLU -> [resample] -> conv, then GroupNorm with scale-shift from the
    conditioning embedding -> SiLU -> dropout -> zero-initialised conv; plus a (1x1 conv) skip."""

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, up: bool = False, down: bool = False
    ) -> None:
        super().__init__()
        self.up, self.down = up, down
        self.in_norm = group_norm(in_ch)
        self.in_conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.out_norm = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        if self.down:
            return F.avg_pool2d(x, 2)  # (B, C, H/2, W/2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # 2 x (B, out_ch, 1, 1)
        h = self.out_norm(h) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv (used when resblock_updown=False)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv (used when resblock_updown=False)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions, with the context tokens joined to the keys and values
    (GLIDE's encoder_kv). Heads = channels // num_head_channels; zero-initialised output projection."""

    def __init__(self, channels: int, num_head_channels: int, context_dim: int | None) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.attn = Attention(channels, channels // num_head_channels, context_dim=context_dim)
        zero_module(self.attn.proj)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, context_mask: torch.Tensor | None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C); a free view under channels_last
        mask = None
        if context_mask is not None:
            pixels = context_mask.new_ones(B, H * W)  # (B, HW): every pixel is a valid key
            mask = torch.cat([context_mask, pixels], dim=1)[:, None, None]  # (B, 1, 1, S + HW)
        h = self.attn(h, context, mask)  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class CondSequential(nn.ModuleList):
    """Layers run in order, each given the inputs it needs (ADM's TimestepEmbedSequential)."""

    def forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, AttentionBlock):
                h = layer(h, context, context_mask)
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    """ADM / GLIDE UNet for the unCLIP decoder (64 px) and upsamplers (64 -> 256 -> 1024).

    `in_channels` counts x_t's channels only: with `lowres_cond` the net adds `in_channels` more for the
    resized low-resolution image (3 for RGB). `image_size` is the training resolution and only fixes which
    levels get attention (`attention_resolutions`, in pixels of the feature map); the net itself runs at any
    size divisible by 2 ** (len(channel_mult) - 1), as the upsamplers do (trained on crops, run full size).
    """

    def __init__(
        self,
        image_size: int,
        model_channels: int,
        channel_mult: list[int],
        num_res_blocks: int,
        attention_resolutions: list[int],
        in_channels: int = 3,
        out_channels: int = 3,
        num_head_channels: int = 64,
        dropout: float = 0.0,
        image_embed_dim: int | None = None,
        text_token_dim: int | None = None,
        num_image_tokens: int = 4,
        lowres_cond: bool = False,
        noise_level_cond: bool = False,
        resblock_updown: bool = True,
        gradient_checkpointing: bool = False,
        coord_channels: bool = False,
        text_pool: bool = False,
        position_embedding: bool = False,
        patch_size: int = 1,
        image_embed_map: int = 0,
        image_embed_map_hidden: int = 0,
        full_res_channels: int = 0,
        text_encoder_layers: int = 0,
    ) -> None:
        super().__init__()
        self.config = init_config(locals())
        channel_mult, attention_resolutions = list(channel_mult), list(attention_resolutions)
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must be >= 1 and divide image_size={image_size}")
        self.patch_size = patch_size
        self._validate_config(image_size // patch_size, model_channels, channel_mult, attention_resolutions,
                              num_head_channels)
        use_attention = len(attention_resolutions) > 0
        if text_token_dim is not None and not use_attention:
            raise ValueError(
                "text_token_dim is set but attention_resolutions is empty: caption tokens reach the UNet "
                "only through attention, so add attention resolutions (e.g. [32, 16, 8]) or set "
                "text_token_dim=None"
            )
        self.in_channels = in_channels
        self.image_embed_dim, self.text_token_dim = image_embed_dim, text_token_dim
        self.lowres_cond, self.noise_level_cond = lowres_cond, noise_level_cond
        self.num_image_tokens = num_image_tokens
        self.gradient_checkpointing = gradient_checkpointing
        if coord_channels and lowres_cond:
            raise ValueError("coord_channels is for nets that run at their training size; an upsampler trains on "
                             "crops, where image coordinates would mean something else at full size")
        self.coord_channels = coord_channels
        if position_embedding and lowres_cond:
            raise ValueError("position_embedding is for nets that run at their training size, not upsamplers")
        self.downsample_factor = patch_size * 2 ** (len(channel_mult) - 1)
        emb_dim = 4 * model_channels
        self.context_dim = context_dim = emb_dim

        # Conditioning embedding: timestep, image embedding (added), noise level of the low-res input (added).
        self.time_embed = TimestepEmbedding(model_channels, emb_dim)
        self.noise_level_embed = TimestepEmbedding(model_channels, emb_dim) if noise_level_cond else None
        self.image_embed_proj = self.image_token_proj = self.null_image_embed = None
        if image_embed_dim is not None:
            self.null_image_embed = nn.Parameter(torch.randn(image_embed_dim) / math.sqrt(image_embed_dim))
            self.image_embed_proj = nn.Linear(image_embed_dim, emb_dim)
            if use_attention and num_image_tokens > 0:
                self.image_token_proj = nn.Linear(image_embed_dim, num_image_tokens * context_dim)
        self.text_token_proj = nn.Linear(text_token_dim, context_dim) if text_token_dim is not None else None
        if text_encoder_layers < 0:
            raise ValueError(f"text_encoder_layers must be >= 0 (0: the caption tokens as given), got "
                             f"{text_encoder_layers}")
        if text_encoder_layers and text_token_dim is None:
            raise ValueError("text_encoder_layers encodes the caption tokens: it needs text_token_dim")
        # GLIDE's text encoder, trained with the decoder (unCLIP section 2.1 concatenates its outputs with the
        # image tokens): bidirectional layers over the projected caption tokens, so each token can take in the
        # whole caption (a causal CLIP text tower's first object has not yet seen the relation that places it)
        self.text_encoder = nn.ModuleList(
            TransformerBlock(context_dim, max(1, context_dim // num_head_channels), 2.0, dropout)
            for _ in range(text_encoder_layers))
        if text_pool and text_token_dim is None:
            raise ValueError("text_pool pools the caption tokens: it needs text_token_dim")
        self.text_pool_proj = nn.Linear(text_token_dim, emb_dim) if text_pool else None
        has_context = self.text_token_proj is not None or self.image_token_proj is not None
        self.context_norm = nn.LayerNorm(context_dim) if has_context else None
        attn_context_dim = context_dim if has_context else None

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_head_channels, attn_context_dim)

        # Down path; `skips` records the channels of every activation the up path will concatenate.
        ch = model_channels
        extra = in_channels if lowres_cond else 2 if coord_channels else 0
        # patch_size p > 1: space-to-depth first (each p x p patch becomes one position with p^2 times the
        # channels) and depth-to-space last, so no level runs at full resolution (simple diffusion,
        # Hoogeboom et al. 2023, sec. 3.2): on small images the widest, costliest level goes.
        self.conv_in = nn.Conv2d((in_channels + extra) * patch_size**2, ch, 3, padding=1)
        # full_res_channels c > 0 (with p > 1): a narrow full-resolution path around the folded net, a 3x3 stem
        # on the input and a residual block (timestep-modulated) on the unfolded output plus the stem: per-pixel
        # work (passing x_t's detail through, telling noise from an outline); on the CPU demo's decoder it costs
        # a fifth more time per step and takes the grain out of v-prediction's samples (docs/RESULTS.md).
        if full_res_channels and patch_size == 1:
            raise ValueError("full_res_channels is the full-resolution path of a folded net: it needs patch_size > 1")
        self.stem = nn.Conv2d(in_channels + extra, full_res_channels, 3, padding=1) if full_res_channels else None
        # A learned map per input feature (zero at init), as ViT's position embedding: with the conditioning's
        # scale-shift it makes "an object there" one multiplication away.
        feature_size = image_size // patch_size
        self.position_embedding = (nn.Parameter(torch.zeros(1, ch, feature_size, feature_size))
                                   if position_embedding else None)
        if image_embed_map and (image_embed_dim is None or feature_size % image_embed_map):
            raise ValueError(f"image_embed_map={image_embed_map} needs image_embed_dim and must divide the first "
                             f"level's size {feature_size} (image_size / patch_size)")
        self.embed_map_size = image_embed_map
        # zero at init, so the fresh net is the one without it; the gradient still reaches its weights
        # image_embed_map_hidden h > 0: one hidden layer (SiLU) first, so the map can draw what the embedding holds
        # only jointly (which colour is at which place when there are two objects) and a linear layer cannot
        out_map = ch * image_embed_map**2
        self.image_embed_map = None
        if image_embed_map:
            self.image_embed_map = (zero_module(nn.Linear(image_embed_dim, out_map)) if not image_embed_map_hidden
                                    else nn.Sequential(nn.Linear(image_embed_dim, image_embed_map_hidden), nn.SiLU(),
                                                       zero_module(nn.Linear(image_embed_map_hidden, out_map))))
        self.down = nn.ModuleList()
        skips, res = [ch], feature_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, mult * model_channels, emb_dim, dropout)]
                ch = mult * model_channels
                if res in attention_resolutions:
                    layers.append(attention(ch))
                self.down.append(CondSequential(layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                down = ResBlock(ch, ch, emb_dim, dropout, down=True) if resblock_updown else Downsample(ch)
                self.down.append(CondSequential([down]))
                skips.append(ch)
                res //= 2

        middle: list[nn.Module] = [ResBlock(ch, ch, emb_dim, dropout)]
        if use_attention:  # ADM's res-attn-res middle; upsamplers (no attention anywhere) skip it
            middle.append(attention(ch))
        self.middle = CondSequential([*middle, ResBlock(ch, ch, emb_dim, dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), mult * model_channels, emb_dim, dropout)]
                ch = mult * model_channels
                if res in attention_resolutions:
                    layers.append(attention(ch))
                if level > 0 and i == num_res_blocks:
                    layers.append(ResBlock(ch, ch, emb_dim, dropout, up=True) if resblock_updown else Upsample(ch))
                    res *= 2
                self.up.append(CondSequential(layers))

        # with the full-resolution path the unfolded output feeds its head, whose last conv starts at zero instead
        last = nn.Conv2d(ch, (full_res_channels or out_channels) * patch_size**2, 3, padding=1)
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), last if full_res_channels else zero_module(last),
                                 nn.PixelShuffle(patch_size) if patch_size > 1 else nn.Identity())
        self.head = None
        if full_res_channels:
            self.head = CondSequential([ResBlock(full_res_channels, full_res_channels, emb_dim, dropout)])
            self.head_out = nn.Sequential(group_norm(full_res_channels), nn.SiLU(),
                                          zero_module(nn.Conv2d(full_res_channels, out_channels, 3, padding=1)))

    @staticmethod
    def _validate_config(
        image_size: int,
        model_channels: int,
        channel_mult: list[int],
        attention_resolutions: list[int],
        num_head_channels: int,
    ) -> None:
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ValueError(
                f"image_size={image_size} must be divisible by 2 ** (len(channel_mult) - 1) = {factor}, "
                f"the UNet's total downsampling for channel_mult={channel_mult}"
            )
        level_res = {image_size // 2**i: i for i in range(len(channel_mult))}
        for res in attention_resolutions:
            if res not in level_res:
                raise ValueError(
                    f"attention resolution {res} is not a feature-map size of this UNet; with image_size="
                    f"{image_size} and {len(channel_mult)} levels the sizes are "
                    f"{sorted(level_res, reverse=True)}"
                )
            ch = channel_mult[level_res[res]] * model_channels
            if ch % num_head_channels:
                raise ValueError(
                    f"attention at resolution {res} has {ch} channels, not divisible by num_head_channels="
                    f"{num_head_channels}; heads = channels // num_head_channels"
                )
        if attention_resolutions:  # the middle block attends too, at the lowest resolution
            ch = channel_mult[-1] * model_channels
            if ch % num_head_channels:
                raise ValueError(
                    f"the middle attention has {ch} channels, not divisible by num_head_channels={num_head_channels}"
                )

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        image_embed: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        lowres_image: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
        image_embed_drop_mask: torch.Tensor | None = None,
        text_drop_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t (B, C, H, W), t (B,); image_embed (B, D); text_tokens (B, L, W) with text_mask (B, L) bool
        (True = real token; None = all real); lowres_image (B, C, h, w); noise_level (B,) int in [0, 1000);
        drop masks (B,) bool, True = use the null conditioning. Returns (B, out_channels, H, W).

        text_tokens=None on a text-conditioned UNet means "no caption", the same as dropping it (useful for
        image variations, section 3.1)."""
        self._check(
            x_t,
            t,
            image_embed,
            text_tokens,
            text_mask,
            lowres_image,
            noise_level,
            image_embed_drop_mask,
            text_drop_mask,
        )
        B = x_t.shape[0]

        emb = self.time_embed(t)  # (B, emb_dim)
        if self.noise_level_embed is not None:
            emb = emb + self.noise_level_embed(noise_level)
        context_parts, mask_parts = [], []
        if text_tokens is not None and self.text_token_proj is not None:
            L = text_tokens.shape[1]
            keep = text_mask
            if text_drop_mask is not None:
                dropped = ~text_drop_mask[:, None].expand(B, L)  # (B, L)
                keep = dropped if keep is None else keep & dropped
            if keep is not None:
                # Zero masked-out tokens so their values (even non-finite padding) cannot reach any output.
                text_tokens = torch.where(keep[:, :, None], text_tokens, 0.0)  # (B, L, W)
            context_parts.append(self.encode_text(self.text_token_proj(text_tokens), keep))  # (B, L, context_dim)
            mask_parts.append(keep)
            if self.text_pool_proj is not None:  # the mean of the kept tokens (zero when all are dropped)
                weights = keep.to(text_tokens.dtype) if keep is not None else text_tokens.new_ones(B, L)
                pooled = (text_tokens * weights[:, :, None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
                emb = emb + self.text_pool_proj(pooled)  # (B, emb_dim)
        if self.image_embed_proj is not None:
            if image_embed_drop_mask is not None:
                null = self.null_image_embed.to(image_embed.dtype)
                image_embed = torch.where(image_embed_drop_mask[:, None], null, image_embed)  # (B, D)
            emb = emb + self.image_embed_proj(image_embed)
            if self.image_embed_map is not None:
                r = self.embed_map_size
                layout = self.image_embed_map(image_embed).view(B, -1, r, r)  # (B, model_channels, r, r)
            if self.image_token_proj is not None:
                tokens = self.image_token_proj(image_embed).view(B, self.num_image_tokens, self.context_dim)
                context_parts.append(tokens)  # (B, N, context_dim)
                mask_parts.append(None)  # image tokens are always valid
        context = context_mask = None
        if context_parts:
            context = self.context_norm(torch.cat(context_parts, dim=1))  # (B, S, context_dim)
            if any(m is not None for m in mask_parts):  # decided by which args were passed, not by values
                context_mask = torch.cat(
                    [
                        m if m is not None else x_t.new_ones(B, c.shape[1], dtype=torch.bool)
                        for m, c in zip(mask_parts, context_parts)
                    ],
                    dim=1,
                )  # (B, S)

        h = x_t
        if lowres_image is not None:
            lowres_image = resize_lowres(lowres_image, tuple(x_t.shape[-2:]))  # (B, C, H, W)
            h = torch.cat([x_t, lowres_image.to(x_t.dtype)], dim=1)  # (B, 2C, H, W)
        if self.coord_channels:
            h = torch.cat([h, coordinate_channels(x_t)], dim=1)  # (B, C + 2, H, W)
        stem = self.stem(h) if self.stem is not None else None  # (B, full_res_channels, H, W)
        if self.patch_size > 1:
            h = F.pixel_unshuffle(h, self.patch_size)  # (B, C p^2, H / p, W / p)
        h = self.conv_in(h)  # (B, model_channels, H / p, W / p)
        if self.position_embedding is not None:
            h = h + self.position_embedding.to(h.dtype)
        if self.image_embed_map is not None:  # nearest: each map cell covers a block of the first level
            h = h + F.interpolate(layout.to(h.dtype), size=h.shape[-2:], mode="nearest")  # (B, ch, H/p, W/p)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.middle, h, emb, context, context_mask)
        for block in self.up:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, ch + skip_ch, H', W')
            h = self._run(block, h, emb, context, context_mask)
        if self.head is not None:  # unfolded to (B, full_res_channels, H, W), joined with the stem
            return self.head_out(self._run(self.head, self.out(h) + stem, emb, None, None))
        return self.out(h)  # (B, out_channels, H, W): depth-to-space back to full size when p > 1

    def encode_text(self, tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The `text_encoder` layers over projected caption tokens (B, L, context_dim); keep (B, L) bool or None.
        Kept tokens attend to kept tokens only; a caption with none kept (dropped) attends to all of its zeroed
        tokens, which the context mask then hides from the UNet."""
        if not len(self.text_encoder):
            return tokens
        mask = None
        if keep is not None:
            keys = keep | ~keep.any(1, keepdim=True)  # (B, L): no row without a key to attend to
            mask = keys[:, None, None, :]  # (B, 1, 1, L), broadcast over heads and queries
        for block in self.text_encoder:
            tokens = block(tokens, mask)
        return tokens

    def _run(self, block: CondSequential, h, emb, context, context_mask) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, context_mask, use_reentrant=False)
        return block(h, emb, context, context_mask)

    def _check(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        image_embed: torch.Tensor | None,
        text_tokens: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        lowres_image: torch.Tensor | None,
        noise_level: torch.Tensor | None,
        image_embed_drop_mask: torch.Tensor | None,
        text_drop_mask: torch.Tensor | None,
    ) -> None:
        """Check the arguments against the configuration; static properties only (torch.compile friendly)."""
        if x_t.ndim != 4 or x_t.shape[1] != self.in_channels:
            raise ValueError(f"x_t must be (B, in_channels={self.in_channels}, H, W), got {tuple(x_t.shape)}")
        B, (H, W), f = x_t.shape[0], x_t.shape[-2:], self.downsample_factor
        if H % f or W % f:
            raise ValueError(f"x_t is {H}x{W}, but this UNet downsamples by {f}: H and W must be multiples of {f}")
        _check_shape("t", t, (B,))
        trained = self.config["image_size"]
        sized = self.position_embedding is not None or self.image_embed_map is not None
        if sized and (H, W) != (trained, trained):
            raise ValueError(f"x_t is {H}x{W}, but this UNet has a position embedding or image embedding map for "
                             f"its training size {trained} px; sample at that size")

        has_image, has_text = self.image_embed_dim is not None, self.text_token_dim is not None
        _check_presence(
            "image_embed",
            image_embed,
            has_image,
            f"image_embed_dim={self.image_embed_dim}",
            required=True,
            hint="; for unconditional samples pass any image_embed with image_embed_drop_mask all True",
        )
        _check_presence("image_embed_drop_mask", image_embed_drop_mask, has_image, "image_embed_dim=None")
        _check_presence("text_tokens", text_tokens, has_text, "text_token_dim=None")
        _check_presence("text_drop_mask", text_drop_mask, has_text, "text_token_dim=None")
        _check_presence(
            "lowres_image",
            lowres_image,
            self.lowres_cond,
            f"lowres_cond={self.lowres_cond}",
            required=True,
            hint="; an upsampler refines the low-resolution image it is given",
        )
        _check_presence(
            "noise_level",
            noise_level,
            self.noise_level_cond,
            f"noise_level_cond={self.noise_level_cond}",
            required=True,
            hint="; pass the augmentation timestep of lowres_image (0 = clean)",
        )
        if text_mask is not None and text_tokens is None:
            raise ValueError("text_mask was passed without text_tokens; it marks which caption tokens are real")

        if image_embed is not None:
            _check_shape("image_embed", image_embed, (B, self.image_embed_dim))
        if text_tokens is not None:
            L = text_tokens.shape[1]
            _check_shape("text_tokens", text_tokens, (B, L, self.text_token_dim))
            if text_mask is not None:
                _check_shape("text_mask", text_mask, (B, L), torch.bool)
        if lowres_image is not None:
            _check_shape("lowres_image", lowres_image, (B, self.in_channels, *lowres_image.shape[2:]))
        if noise_level is not None:
            _check_shape("noise_level", noise_level, (B,))
        for name, mask in (
            ("image_embed_drop_mask", image_embed_drop_mask),
            ("text_drop_mask", text_drop_mask),
        ):
            if mask is not None:
                _check_shape(name, mask, (B,), torch.bool)


def _check_presence(
    name: str,
    value: torch.Tensor | None,
    configured: bool,
    built_with: str,
    required: bool = False,
    hint: str = "",
) -> None:
    """Teach a mismatch between a conditioning input and the configuration that enables it."""
    if value is None and configured and required:
        raise ValueError(f"this UNet was built with {built_with}, so {name} is required{hint}")
    if value is not None and not configured:
        raise ValueError(
            f"this UNet was built with {built_with}, but {name} was passed; rebuild it with that "
            "conditioning enabled, or leave the argument out"
        )


def _check_shape(name: str, value: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None) -> None:
    if tuple(value.shape) != tuple(shape) or (dtype is not None and value.dtype != dtype):
        expected = f"{tuple(shape)}" + (f" {dtype}" if dtype is not None else "")
        raise ValueError(f"{name} must be {expected}, got {tuple(value.shape)} {value.dtype}")
