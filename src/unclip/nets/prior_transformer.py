"""The diffusion prior's denoiser: a decoder-only causal Transformer over CLIP embeddings.

unCLIP section 2.2 (Ramesh et al. 2022): "we train a decoder-only Transformer with a causal attention mask on
a sequence consisting of, in order: the encoded text, the CLIP text embedding, an embedding for the diffusion
timestep, the noised CLIP image embedding, and a final embedding whose output from the Transformer is used
to predict the unnoised CLIP image embedding."

Sequence layout, T = L + 4 positions:

    [text_tokens (L) | text_embed | time_embed | x_t | query]
      positions 0..L-1  N           N+1          N+2   N+3      (N = num_text_tokens, the maximum L)

The four trailing tokens always take positional embeddings N..N+3, so a batch of shorter captions (L < N)
sees the same positions for them as a full-length one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from unclip.nets.layers import TimestepEmbedding, TransformerBlock, init_config

NUM_EXTRA_TOKENS = 4  # text_embed, time_embed, x_t, query


class PriorTransformer(nn.Module):
    """Denoiser of the unCLIP diffusion prior (section 2.2): predicts from the noised image embedding x_t.

    The prediction is read at the learned query position through a final LayerNorm and Linear; whether it
    is x0 or noise is the diffusion code's choice. Classifier-free guidance (section 2.2, "randomly dropping
    this text conditioning information 10% of the time"): where `cond_drop_mask` is True the text embedding
    is replaced by a learned `null_text_embed` and the caption tokens are masked out entirely, while x_t
    and t always go in.
    """

    def __init__(
        self,
        embed_dim: int,
        text_token_dim: int,
        num_text_tokens: int,
        width: int,
        depth: int,
        heads: int,
        dropout: float = 0.0,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.config = init_config(locals())
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads} (head size = width // heads)")
        self.embed_dim, self.text_token_dim, self.num_text_tokens = embed_dim, text_token_dim, num_text_tokens

        self.text_token_proj = nn.Linear(text_token_dim, width)
        self.text_embed_proj = nn.Linear(embed_dim, width)
        self.time_embed = TimestepEmbedding(width, width)
        self.x_proj = nn.Linear(embed_dim, width)
        self.query = nn.Parameter(torch.zeros(width))
        self.pos_embed = nn.Parameter(torch.zeros(num_text_tokens + NUM_EXTRA_TOKENS, width))
        # Unit-norm-scale start, like a CLIP embedding; learned from the dropped samples.
        self.null_text_embed = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.out = nn.Linear(width, embed_dim)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 * depth)."""
        for name, p in self.named_parameters():
            if name == "null_text_embed" or "ln_" in name:
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                residual_proj = "blocks" in name and name.endswith("proj.weight")
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth) if residual_proj else 0.02)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        text_embed: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        cond_drop_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t (B, D), t (B,), text_embed (B, D), text_tokens (B, L, W), text_mask (B, L) bool (True = real
        token), cond_drop_mask (B,) bool (True = use the null conditioning). Returns (B, D)."""
        self._check(x_t, t, text_embed, text_tokens, text_mask, cond_drop_mask)
        keep, text_embed, text_tokens = self._dropped(text_embed, text_tokens, text_mask, cond_drop_mask)
        L = keep.shape[1]
        tokens = torch.cat([self._prefix_tokens(text_embed, text_tokens), self._step_tokens(x_t, t)], dim=1)
        h = self.drop(tokens + self._positions(L))  # (B, T, width), T = L + 4

        mask = self._attention_mask(keep)  # (B, 1, T, T)
        for block in self.blocks:
            h = block(h, mask)
        return self.out(self.ln_f(h[:, -1]))  # (B, D)

    def conditioned(
        self,
        *,
        text_embed: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        cond_drop_mask: torch.Tensor | None = None,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The denoiser for fixed conditioning, for sampling: (x_t (B, D), t (B,)) -> (B, D), equal to
        `forward(x_t, t, **conditioning)` up to rounding.

        The caption tokens and the text embedding come before t and x_t in the causal sequence, so their
        states never depend on the step: their keys and values in every block are computed once here, and
        each step runs only the last three positions (time, x_t, query) against them, about (L + 4) / 3
        times less work per step than `forward`. Shapes as in `forward`.
        """
        self._check(text_embed, text_embed[:, 0], text_embed, text_tokens, text_mask, cond_drop_mask)
        keep, text_embed, text_tokens = self._dropped(text_embed, text_tokens, text_mask, cond_drop_mask)
        B, L = keep.shape
        P = L + 1  # the prefix: caption tokens and the text embedding
        pos = self._positions(L)  # (T, width)
        mask = self._attention_mask(keep)  # (B, 1, T, T)
        h = self.drop(self._prefix_tokens(text_embed, text_tokens) + pos[:P])  # (B, P, width)
        prefix_kv = []
        for block in self.blocks:
            q, k, v = block.attn.project(block.ln_1(h))  # (B, heads, P, hs) each
            prefix_kv.append((k, v))
            h = h + block.attn.attend(q, k, v, mask[:, :, :P, :P])
            h = h + block.mlp(block.ln_2(h))
        step_mask = mask[:, :, P:]  # (B, 1, 3, T): the last three rows

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if x_t.shape != (B, self.embed_dim) or t.shape != (B,):
                raise ValueError(f"x_t must be ({B}, {self.embed_dim}) and t ({B},) as the conditioning; got "
                                 f"{tuple(x_t.shape)} and {tuple(t.shape)}")
            h = self.drop(self._step_tokens(x_t, t) + pos[P:])  # (B, 3, width)
            for block, (k, v) in zip(self.blocks, prefix_kv):
                q, k_new, v_new = block.attn.project(block.ln_1(h))  # (B, heads, 3, hs) each
                keys, values = torch.cat([k, k_new.to(k.dtype)], dim=2), torch.cat([v, v_new.to(v.dtype)], dim=2)
                h = h + block.attn.attend(q, keys, values, step_mask)
                h = h + block.mlp(block.ln_2(h))
            return self.out(self.ln_f(h[:, -1]))  # (B, D)

        return denoise

    def _dropped(
        self, text_embed: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
        cond_drop_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Guidance dropping: keep (B, L) bool, text_embed (B, D) with the null embedding where dropped, and
        text_tokens (B, L, W) zeroed where not kept (even non-finite padding cannot reach any output)."""
        keep = text_mask
        if cond_drop_mask is not None:
            keep = keep & ~cond_drop_mask[:, None]  # (B, L)
            text_embed = torch.where(cond_drop_mask[:, None], self.null_text_embed.to(text_embed.dtype), text_embed)
        return keep, text_embed, torch.where(keep[:, :, None], text_tokens, 0.0)

    def _prefix_tokens(self, text_embed: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """(B, L + 1, width): the caption tokens, then the text embedding."""
        return torch.cat([self.text_token_proj(text_tokens), self.text_embed_proj(text_embed)[:, None]], dim=1)

    def _step_tokens(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, 3, width): the timestep, the noised embedding and the learned query."""
        B = x_t.shape[0]
        return torch.cat([self.time_embed(t)[:, None], self.x_proj(x_t)[:, None], self.query.expand(B, 1, -1)], dim=1)

    def _positions(self, L: int) -> torch.Tensor:
        """(L + 4, width): the first L caption positions, then the four fixed trailing ones."""
        return torch.cat([self.pos_embed[:L], self.pos_embed[self.num_text_tokens :]])

    @staticmethod
    def _attention_mask(keep: torch.Tensor) -> torch.Tensor:
        """Causal AND (key valid OR key is the query itself); (B, L) -> (B, 1, T, T), True = may attend.

        The diagonal term guarantees every row has a key: SDPA returns NaN for a fully masked row, and a NaN
        value still poisons later layers through zero attention weights (0 * NaN = NaN).
        """
        B, L = keep.shape
        T = L + NUM_EXTRA_TOKENS
        valid = torch.cat([keep, keep.new_ones(B, NUM_EXTRA_TOKENS)], dim=1)  # (B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=keep.device).tril()  # (T, T)
        eye = torch.eye(T, dtype=torch.bool, device=keep.device)  # (T, T)
        return (causal & (valid[:, None, :] | eye))[:, None]  # (B, 1, T, T)

    def _check(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text_embed: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        cond_drop_mask: torch.Tensor | None,
    ) -> None:
        """Shape and dtype checks on static properties only (no host sync, torch.compile friendly)."""
        B, D = x_t.shape[0], self.embed_dim
        if x_t.shape != (B, D) or text_embed.shape != (B, D):
            raise ValueError(
                f"x_t and text_embed must be (B, embed_dim={D}); got {tuple(x_t.shape)} and "
                f"{tuple(text_embed.shape)} (is embed_dim the CLIP embedding width?)"
            )
        if t.shape != (B,):
            raise ValueError(f"t must be a (B,) = ({B},) tensor of timesteps, got shape {tuple(t.shape)}")
        L, W = text_mask.shape[-1], self.text_token_dim
        if text_mask.shape != (B, L) or text_tokens.shape != (B, L, W) or text_mask.dtype != torch.bool:
            raise ValueError(
                f"text_tokens must be (B, L, text_token_dim={W}) and text_mask (B, L) bool; got "
                f"{tuple(text_tokens.shape)} and {tuple(text_mask.shape)} {text_mask.dtype}"
            )
        if L > self.num_text_tokens:
            raise ValueError(
                f"{L} text tokens were passed but this prior was built with num_text_tokens="
                f"{self.num_text_tokens}; rebuild it with the text encoder's context length"
            )
        if cond_drop_mask is not None and (cond_drop_mask.shape != (B,) or cond_drop_mask.dtype != torch.bool):
            raise ValueError(
                f"cond_drop_mask must be a (B,) = ({B},) bool tensor (True = drop the text), got "
                f"{tuple(cond_drop_mask.shape)} {cond_drop_mask.dtype}"
            )
