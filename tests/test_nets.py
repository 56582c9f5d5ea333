"""Behaviour of the denoisers (unclip.nets) at tiny sizes on CPU: shapes, masks, null conditioning, config."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from unclip.nets import PriorTransformer, UNet
from unclip.nets.layers import group_norm, init_config
from unclip.nets.unet import resize_lowres

B, D, L, W = 3, 32, 10, 32  # batch, CLIP embedding width, caption length, caption token width

TINY_PRIOR = dict(embed_dim=D, text_token_dim=W, num_text_tokens=32, width=32, depth=2, heads=2)
TINY_DECODER = dict(
    image_size=32,
    model_channels=8,
    channel_mult=[1, 2],
    num_res_blocks=1,
    attention_resolutions=[16],
    num_head_channels=8,
    image_embed_dim=D,
    text_token_dim=W,
)
TINY_UPSAMPLER = dict(
    image_size=32,
    model_channels=8,
    channel_mult=[1, 2],
    num_res_blocks=1,
    attention_resolutions=[],
    lowres_cond=True,
    noise_level_cond=True,
)


pytestmark = pytest.mark.usefixtures("single_thread")


def perturb(net: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Move every weight off its init (zero-initialised layers included) so every path carries signal."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * std)
    return net


def prior_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(B, L, dtype=torch.bool)
    text_mask[0, 6:] = False  # sample 0 has a 6-token caption
    text_mask[1, 3:] = False  # sample 1 has a 3-token caption
    return dict(
        x_t=torch.randn(B, D, generator=g),
        t=torch.randint(0, 1000, (B,), generator=g),
        text_embed=torch.randn(B, D, generator=g),
        text_tokens=torch.randn(B, L, W, generator=g),
        text_mask=text_mask,
    )


def run_prior(net: PriorTransformer, inputs: dict, **overrides) -> torch.Tensor:
    kw = {**inputs, **overrides}
    return net(kw.pop("x_t"), kw.pop("t"), **kw)


def decoder_inputs(seed: int = 0, size: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(B, L, dtype=torch.bool)
    text_mask[0, 4:] = False
    return dict(
        x_t=torch.randn(B, 3, size, size, generator=g),
        t=torch.randint(0, 1000, (B,), generator=g),
        image_embed=torch.randn(B, D, generator=g),
        text_tokens=torch.randn(B, L, W, generator=g),
        text_mask=text_mask,
    )


def run_unet(net: UNet, inputs: dict, **overrides) -> torch.Tensor:
    kw = {**inputs, **overrides}
    return net(kw.pop("x_t"), kw.pop("t"), **kw)


def upsampler_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        x_t=torch.randn(B, 3, 32, 32, generator=g),
        t=torch.randint(0, 1000, (B,), generator=g),
        lowres_image=torch.rand(B, 3, 16, 16, generator=g) * 2 - 1,
        noise_level=torch.randint(0, 1000, (B,), generator=g),
    )


# ---------------------------------------------------------------------------------------------------- layers


def test_group_norm_picks_largest_divisor_up_to_32():
    assert [group_norm(c).num_groups for c in (8, 48, 96, 100, 320)] == [8, 24, 32, 25, 32]


def test_init_config_is_plain_json():
    def ctor(self, a: int, b: tuple = (1, 2), c: float | None = None):
        return init_config(locals())

    assert ctor(None, 3) == {"a": 3, "b": [1, 2], "c": None}
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        ctor(None, torch.zeros(1))


# ----------------------------------------------------------------------------------------------------- prior


def test_prior_output_shape_and_shorter_captions():
    net = PriorTransformer(**TINY_PRIOR)
    inputs = prior_inputs()
    assert run_prior(net, inputs).shape == (B, D)
    short = {**inputs, "text_tokens": inputs["text_tokens"][:, :4], "text_mask": inputs["text_mask"][:, :4]}
    assert run_prior(net, short).shape == (B, D)
    long = dict(text_tokens=torch.randn(B, 33, W), text_mask=torch.ones(B, 33, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_text_tokens=32"):
        run_prior(net, inputs, **long)


def test_prior_padding_mask():
    net = PriorTransformer(**TINY_PRIOR).eval()
    inputs = prior_inputs()
    out = run_prior(net, inputs)
    tokens = inputs["text_tokens"].clone()
    tokens[0, 6:] = 1e4  # padding of sample 0
    tokens[1, 3:] = float("nan")  # padding of sample 1, even non-finite
    assert torch.equal(run_prior(net, inputs, text_tokens=tokens), out)
    tokens = inputs["text_tokens"].clone()
    tokens[0, 2] += 1.0  # a real token of sample 0
    changed = run_prior(net, inputs, text_tokens=tokens)
    assert not torch.allclose(changed[0], out[0])
    assert torch.equal(changed[1:], out[1:])  # samples stay independent


def test_prior_causal_mask():
    """Position i sees only positions <= i: check the last block's hidden states."""
    net = PriorTransformer(**TINY_PRIOR).eval()
    hidden = []
    net.blocks[-1].register_forward_hook(lambda module, args, output: hidden.append(output))
    inputs = prior_inputs()
    run_prior(net, inputs)
    run_prior(net, inputs, x_t=inputs["x_t"] + 1.0)  # x_t sits at position L + 2
    before, after = hidden
    assert torch.equal(before[:, : L + 2], after[:, : L + 2])
    assert not torch.allclose(before[:, L + 2 :], after[:, L + 2 :])


def test_prior_null_conditioning():
    net = perturb(PriorTransformer(**TINY_PRIOR)).eval()
    drop = torch.ones(B, dtype=torch.bool)
    a, b = prior_inputs(seed=0), prior_inputs(seed=1)
    other_cond = dict(text_embed=b["text_embed"], text_tokens=b["text_tokens"], text_mask=~a["text_mask"])
    uncond = run_prior(net, a, cond_drop_mask=drop)
    assert torch.equal(run_prior(net, a, cond_drop_mask=drop, **other_cond), uncond)
    assert not torch.allclose(run_prior(net, a), uncond)
    # The unconditional branch still sees x_t and t.
    assert not torch.allclose(run_prior(net, a, cond_drop_mask=drop, x_t=b["x_t"]), uncond)
    assert not torch.allclose(run_prior(net, a, cond_drop_mask=drop, t=(a["t"] + 100) % 1000), uncond)
    # A mixed mask drops exactly the flagged samples.
    mixed = run_prior(net, a, cond_drop_mask=torch.tensor([True, False, False]))
    assert torch.equal(mixed[0], uncond[0]) and torch.equal(mixed[1:], run_prior(net, a)[1:])


def test_prior_all_padding_is_finite():
    net = perturb(PriorTransformer(**TINY_PRIOR))
    inputs = prior_inputs()
    no_text = torch.zeros(B, L, dtype=torch.bool)
    out = run_prior(net, inputs, text_mask=no_text)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------------------ UNet


@pytest.mark.parametrize("resblock_updown", [True, False])
def test_decoder_shapes_and_zero_init(resblock_updown):
    net = UNet(**TINY_DECODER, resblock_updown=resblock_updown)
    inputs = decoder_inputs()
    out = run_unet(net, inputs)
    assert out.shape == (B, 3, 32, 32)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output conv and residual branches
    assert run_unet(perturb(net), inputs).abs().sum() > 0


def test_decoder_image_only_and_learned_variance():
    cfg = {**TINY_DECODER, "text_token_dim": None, "out_channels": 6}
    net = UNet(**cfg)
    inputs = decoder_inputs()
    out = net(inputs["x_t"], inputs["t"], image_embed=inputs["image_embed"])
    assert out.shape == (B, 6, 32, 32)
    with pytest.raises(ValueError, match="built with text_token_dim=None, but text_tokens was passed"):
        run_unet(net, inputs)


def test_upsampler_shapes_and_zero_init():
    net = UNet(**TINY_UPSAMPLER)
    assert net.conv_in.in_channels == 6  # x_t plus the resized low-res image
    inputs = upsampler_inputs()
    out = run_unet(net, inputs)
    assert out.shape == (B, 3, 32, 32) and torch.equal(out, torch.zeros_like(out))
    perturb(net)
    # A low-res image already at the output size is used as is; a 16 px one is resized to 32 px first.
    resized = resize_lowres(inputs["lowres_image"], (32, 32))
    assert resized.shape == (B, 3, 32, 32) and resize_lowres(resized, (32, 32)) is resized
    torch.testing.assert_close(run_unet(net, inputs), run_unet(net, inputs, lowres_image=resized))
    # Upsamplers train on crops and run at full size: any multiple of the downsampling factor works.
    big = {**inputs, "x_t": torch.randn(B, 3, 64, 64)}
    assert run_unet(net, big).shape == (B, 3, 64, 64)
    other_level = inputs["noise_level"] // 2
    assert not torch.allclose(run_unet(net, inputs), run_unet(net, inputs, noise_level=other_level))


def test_unet_text_padding_mask():
    net = perturb(UNet(**TINY_DECODER)).eval()
    inputs = decoder_inputs()
    out = run_unet(net, inputs)
    tokens = inputs["text_tokens"].clone()
    tokens[0, 4:] = float("nan")  # padding of sample 0
    assert torch.equal(run_unet(net, inputs, text_tokens=tokens), out)
    tokens = inputs["text_tokens"].clone()
    tokens[0, 1] += 1.0
    assert not torch.allclose(run_unet(net, inputs, text_tokens=tokens)[0], out[0])


def test_unet_null_conditioning():
    net = perturb(UNet(**TINY_DECODER)).eval()
    a, b = decoder_inputs(seed=0), decoder_inputs(seed=1)
    drop = torch.ones(B, dtype=torch.bool)
    dropped = dict(image_embed_drop_mask=drop, text_drop_mask=drop)
    uncond = run_unet(net, a, **dropped)
    other_cond = dict(image_embed=b["image_embed"], text_tokens=b["text_tokens"], text_mask=~a["text_mask"])
    assert torch.equal(run_unet(net, a, **dropped, **other_cond), uncond)
    assert not torch.allclose(run_unet(net, a), uncond)
    # Each conditioning is dropped on its own.
    text_only = run_unet(net, a, image_embed_drop_mask=drop)
    image_only = run_unet(net, a, text_drop_mask=drop)
    assert not torch.allclose(text_only, uncond) and not torch.allclose(image_only, uncond)
    # No caption at all is the null caption.
    no_text = net(a["x_t"], a["t"], image_embed=a["image_embed"])
    torch.testing.assert_close(no_text, image_only, rtol=1e-5, atol=1e-6)


def test_text_encoder_is_bidirectional_masked_and_keeps_the_null_caption():
    """text_encoder_layers: an earlier token's encoding takes in a later one (a causal tower's cannot); padding
    (even NaN) reaches nothing; a dropped caption gives the same output as no caption, finite; it learns."""
    net = perturb(UNet(**TINY_DECODER, text_encoder_layers=2)).eval()
    inputs = decoder_inputs()
    tokens, keep = net.text_token_proj(inputs["text_tokens"]), inputs["text_mask"]
    encoded = net.encode_text(tokens, keep)
    later = tokens.clone()
    later[0, 3] += torch.randn(later.shape[-1])  # not a constant: LayerNorm would remove that
    assert not torch.allclose(net.encode_text(later, keep)[0, 0], encoded[0, 0])  # token 0 sees token 3
    out = run_unet(net, inputs)
    padded = inputs["text_tokens"].clone()
    padded[0, 4:] = float("nan")  # padding of sample 0
    assert torch.equal(run_unet(net, inputs, text_tokens=padded), out)
    drop = torch.ones(B, dtype=torch.bool)
    dropped = run_unet(net, inputs, text_drop_mask=drop)
    assert torch.isfinite(dropped).all()
    torch.testing.assert_close(net(inputs["x_t"], inputs["t"], image_embed=inputs["image_embed"]), dropped,
                               rtol=1e-5, atol=1e-6)
    assert UNet(**TINY_DECODER).text_encoder is not None and len(UNet(**TINY_DECODER).text_encoder) == 0
    with pytest.raises(ValueError, match="needs text_token_dim"):
        UNet(**{**TINY_DECODER, "text_token_dim": None}, text_encoder_layers=1)
    with pytest.raises(ValueError, match="must be >= 0"):
        UNet(**TINY_DECODER, text_encoder_layers=-1)
    net.train()
    run_unet(net, {**inputs, "text_drop_mask": torch.tensor([True, False, False])}).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.text_encoder.parameters())


def test_unet_all_parameters_get_gradients():
    """DDP without find_unused_parameters needs every parameter in the graph, null embeddings included."""
    for cfg, inputs in ((TINY_DECODER, decoder_inputs()), (TINY_UPSAMPLER, upsampler_inputs())):
        net = perturb(UNet(**cfg))
        if "image_embed" in inputs:
            inputs = {**inputs, "image_embed_drop_mask": torch.tensor([True, False, False])}
        run_unet(net, inputs).square().mean().backward()
        assert [n for n, p in net.named_parameters() if p.grad is None] == []


def test_unet_gradient_checkpointing_matches():
    inputs = decoder_inputs()
    plain = perturb(UNet(**TINY_DECODER))
    ckpt = UNet(**{**TINY_DECODER, "gradient_checkpointing": True})
    ckpt.load_state_dict(plain.state_dict())
    outs = []
    for net in (plain, ckpt):
        out = run_unet(net, inputs)
        out.square().mean().backward()
        outs.append((out, net.conv_in.weight.grad))
    torch.testing.assert_close(outs[0], outs[1])


def test_unet_channels_last_matches():
    net = perturb(UNet(**TINY_DECODER)).eval()
    inputs = decoder_inputs()
    out = run_unet(net, inputs)
    net = net.to(memory_format=torch.channels_last)
    x_t = inputs["x_t"].to(memory_format=torch.channels_last)
    torch.testing.assert_close(run_unet(net, inputs, x_t=x_t), out, rtol=1e-4, atol=1e-5)


def test_unet_teaching_errors():
    with pytest.raises(ValueError, match="not a feature-map size"):
        UNet(**{**TINY_DECODER, "attention_resolutions": [12]})
    with pytest.raises(ValueError, match="only through attention"):
        UNet(**{**TINY_DECODER, "attention_resolutions": []})
    with pytest.raises(ValueError, match="not divisible by num_head_channels"):
        UNet(**{**TINY_DECODER, "num_head_channels": 64})
    up = UNet(**TINY_UPSAMPLER)
    inputs = upsampler_inputs()
    with pytest.raises(ValueError, match="built with image_embed_dim=None, but image_embed was passed"):
        run_unet(up, inputs, image_embed=torch.randn(B, D))
    with pytest.raises(ValueError, match="lowres_cond=True, so lowres_image is required"):
        run_unet(up, inputs, lowres_image=None)
    with pytest.raises(ValueError, match="multiples of 2"):
        run_unet(up, inputs, x_t=torch.randn(B, 3, 33, 33))
    dec = UNet(**TINY_DECODER)
    with pytest.raises(ValueError, match="text_mask must be"):
        run_unet(dec, decoder_inputs(), text_mask=torch.ones(B, L))


# ---------------------------------------------------------------------------------------- both: config, bf16


def all_nets():
    return [
        (PriorTransformer(**TINY_PRIOR), prior_inputs(), run_prior),
        (UNet(**TINY_DECODER), decoder_inputs(), run_unet),
        (UNet(**TINY_UPSAMPLER), upsampler_inputs(), run_unet),
        (UNet(**TINY_DECODER, coord_channels=True, text_pool=True, position_embedding=True), decoder_inputs(),
         run_unet),
        (UNet(**TINY_DECODER, patch_size=2), decoder_inputs(), run_unet),
        (UNet(**TINY_DECODER, patch_size=2, image_embed_map=8, text_encoder_layers=1), decoder_inputs(), run_unet),
    ]


def test_patch_size_runs_every_level_below_full_resolution():
    net = perturb(UNet(**TINY_DECODER, patch_size=2)).eval()
    inputs = decoder_inputs()
    out = run_unet(net, inputs)
    assert out.shape == inputs["x_t"].shape
    sizes = []
    hook = net.conv_in.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:])))
    run_unet(net, inputs)
    hook.remove()
    assert sizes == [(16, 16)]  # the first level already runs at half size
    assert torch.count_nonzero(run_unet(UNet(**TINY_DECODER, patch_size=2).eval(), inputs)) == 0  # zero-init out
    with pytest.raises(ValueError, match="patch_size"):
        UNet(**{**TINY_DECODER, "image_size": 30}, patch_size=4)


def test_coordinate_channels_and_pooled_caption_reach_the_output():
    """coord_channels: the net knows where each pixel is, so a flat input no longer gives a translation-invariant
    output; text_pool: a caption token changes the output even with every attention layer silenced."""
    flat = {**decoder_inputs(), "x_t": torch.zeros(B, 3, 32, 32)}
    plain = perturb(UNet(**TINY_DECODER)).eval()
    coords = UNet(**TINY_DECODER, coord_channels=True).eval()
    coords.load_state_dict({**coords.state_dict(), **{k: v for k, v in plain.state_dict().items()
                                                       if k != "conv_in.weight"}})
    with torch.no_grad():
        coords.conv_in.weight[:, :3] = plain.conv_in.weight
        coords.conv_in.weight[:, 3:] = 0.0
    torch.testing.assert_close(run_unet(coords, flat), run_unet(plain, flat))  # zero coordinate weights: same net
    with torch.no_grad():
        coords.conv_in.weight[:, 3:] = 0.5
    out = run_unet(coords, flat)
    assert not torch.allclose(out, run_unet(plain, flat))
    assert not torch.allclose(out[..., :16, :], out[..., 16:, :].flip(-2))  # top and bottom now differ

    pooled = perturb(UNet(**TINY_DECODER, text_pool=True)).eval()
    with torch.no_grad():
        for module in pooled.modules():
            if module.__class__.__name__ == "AttentionBlock":
                module.attn.proj.weight.zero_(), module.attn.proj.bias.zero_()  # no path through attention
    inputs = decoder_inputs()
    tokens = inputs["text_tokens"].clone()
    tokens[:, 1] += 1.0
    assert not torch.allclose(run_unet(pooled, inputs, text_tokens=tokens), run_unet(pooled, inputs))
    dropped = torch.ones(B, dtype=torch.bool)  # a dropped caption pools to nothing: tokens cannot leak
    torch.testing.assert_close(run_unet(pooled, inputs, text_tokens=tokens, text_drop_mask=dropped),
                               run_unet(pooled, inputs, text_drop_mask=dropped))
    with pytest.raises(ValueError, match="coord_channels"):
        UNet(**TINY_UPSAMPLER, coord_channels=True)


def test_position_embedding_starts_at_zero_learns_and_fixes_the_size():
    plain = perturb(UNet(**TINY_DECODER)).eval()
    pos = UNet(**TINY_DECODER, position_embedding=True).eval()
    pos.load_state_dict({**plain.state_dict(), "position_embedding": pos.position_embedding.detach()})
    inputs = decoder_inputs()
    torch.testing.assert_close(run_unet(pos, inputs), run_unet(plain, inputs))  # zero at init: the same net
    run_unet(pos.train(), inputs).square().mean().backward()
    assert pos.position_embedding.grad is not None and pos.position_embedding.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="position embedding"):
        run_unet(pos, decoder_inputs(size=16))


def test_image_embed_map_starts_at_zero_and_draws_the_embedding_where_it_says():
    """image_embed_map: zero at init (the same net as without it), trained by the first backward; once set, a
    change of the image embedding changes the output differently in different places (a spatial pattern, not
    only the per-channel scale-shift), and a dropped embedding maps through the null embedding."""
    plain = perturb(UNet(**TINY_DECODER, patch_size=2)).eval()
    mapped = UNet(**TINY_DECODER, patch_size=2, image_embed_map=8).eval()
    mapped.load_state_dict({**plain.state_dict(), **{k: v for k, v in mapped.state_dict().items()
                                                     if k.startswith("image_embed_map")}})
    inputs = decoder_inputs()
    torch.testing.assert_close(run_unet(mapped, inputs), run_unet(plain, inputs))
    run_unet(mapped.train(), inputs).square().mean().backward()
    assert mapped.image_embed_map.weight.grad.abs().sum() > 0
    mapped.eval()
    with torch.no_grad():
        mapped.image_embed_map.weight.normal_(0, 1.0)
        for net in (plain, mapped):  # silence every other path of the embedding: scale-shift and tokens
            net.image_embed_proj.weight.zero_(), net.image_token_proj.weight.zero_()
    other = {**inputs, "image_embed": inputs["image_embed"] + torch.randn_like(inputs["image_embed"])}
    torch.testing.assert_close(run_unet(plain, other), run_unet(plain, inputs))  # no path left without the map
    delta = (run_unet(mapped, other) - run_unet(mapped, inputs)).abs().mean(dim=(0, 1))  # (H, W)
    assert delta.mean() > 0 and delta.std() > 0.1 * delta.mean()  # it varies over the image
    dropped = torch.ones(B, dtype=torch.bool)
    torch.testing.assert_close(run_unet(mapped, other, image_embed_drop_mask=dropped),
                               run_unet(mapped, inputs, image_embed_drop_mask=dropped))
    with pytest.raises(ValueError, match="image_embed_map"):
        UNet(**TINY_DECODER, patch_size=2, image_embed_map=5)
    with pytest.raises(ValueError, match="training size"):
        run_unet(mapped, decoder_inputs(size=16))


def test_image_embed_map_with_a_hidden_layer_starts_at_zero_and_draws_what_a_linear_map_cannot():
    """image_embed_map_hidden: zero at init (the same net as without the map); its map fits an XOR of two
    embedding directions (colour A at a place when the embedding says "A there and B elsewhere", as two objects
    need), which one linear layer cannot (its best fit is the mean)."""
    plain = perturb(UNet(**TINY_DECODER, patch_size=2)).eval()
    mapped = UNet(**TINY_DECODER, patch_size=2, image_embed_map=8, image_embed_map_hidden=32).eval()
    mapped.load_state_dict({**plain.state_dict(), **{k: v for k, v in mapped.state_dict().items()
                                                     if k.startswith("image_embed_map")}})
    inputs = decoder_inputs()
    torch.testing.assert_close(run_unet(mapped, inputs), run_unet(plain, inputs))
    torch.manual_seed(0)
    d = TINY_DECODER["image_embed_dim"]
    a, b = F.normalize(torch.randn(2, d), dim=-1)
    signs = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    embeds = signs[:, :1] * a + signs[:, 1:] * b  # (4, D)
    target = (signs[:, 0] * signs[:, 1])[:, None]  # (4, 1): +1 when the two agree
    errors = {}
    for name, hidden in (("linear", 0), ("hidden", 32)):
        net = UNet(**TINY_DECODER, patch_size=2, image_embed_map=8, image_embed_map_hidden=hidden)
        opt = torch.optim.Adam(net.image_embed_map.parameters(), lr=1e-2)
        for _ in range(300):
            out = net.image_embed_map(embeds)  # (4, channels * 8 * 8)
            loss = (out - target).square().mean()
            opt.zero_grad(), loss.backward(), opt.step()
        errors[name] = loss.item()
    assert errors["linear"] > 0.9 and errors["hidden"] < 0.05, errors


@pytest.mark.parametrize("index", range(6))
def test_config_rebuilds_identical_net(index):
    net, inputs, run = all_nets()[index]
    net = perturb(net).eval()
    config = json.loads(json.dumps(net.config))  # what a checkpoint stores
    rebuilt = type(net)(**config).eval()
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    assert rebuilt.config == net.config
    assert torch.equal(run(rebuilt, inputs), run(net, inputs))


@pytest.mark.parametrize("index", range(6))
def test_bf16_autocast_cpu(index):
    net, inputs, run = all_nets()[index]
    net = perturb(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(net, inputs)
    assert torch.isfinite(out.float()).all()
    out.float().square().mean().backward()


def test_attention_under_cpu_bf16_autocast_attends_in_fp32():
    """On the CPU, bf16 autocast keeps the projections in bf16 but runs SDPA on fp32 copies of q, k, v (its bf16
    kernels are slower there): the attended values match fp32 SDPA of the same bf16 inputs, not bf16 SDPA."""
    from unclip.nets.layers import Attention

    torch.manual_seed(0)
    attn = Attention(32, heads=2, context_dim=16)
    x, context = torch.randn(3, 10, 32), torch.randn(3, 5, 16)
    seen = {}
    attend = attn.attend

    def spy(q, k, v, mask):
        seen["qkv"] = (q, k, v)
        return attend(q, k, v, mask)

    attn.attend = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, context)
        q, k, v = seen["qkv"]
        assert q.dtype == torch.bfloat16  # the projections did run in bf16
    y32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    y16 = F.scaled_dot_product_attention(q, k, v).float()
    assert not torch.equal(y32, y16)  # the test can tell the two apart
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = attn.proj(y32.transpose(1, 2).reshape(3, 10, 32))
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=0)


@pytest.mark.parametrize("index", range(6))
def test_dynamo_traces_without_graph_breaks(index):
    """fullgraph=True fails on any graph break; the eager backend checks that in seconds (no codegen)."""
    net, inputs, run = all_nets()[index]
    drop = torch.tensor([True, False, True])
    if isinstance(net, PriorTransformer):
        inputs = {**inputs, "cond_drop_mask": drop}
    elif net.image_embed_dim is not None:
        inputs = {**inputs, "image_embed_drop_mask": drop, "text_drop_mask": ~drop}
    torch._dynamo.reset()
    compiled = torch.compile(perturb(net), fullgraph=True, backend="eager")
    torch.testing.assert_close(run(compiled, inputs), run(net, inputs))


@pytest.mark.slow
@pytest.mark.parametrize("index", range(3))
def test_torch_compile_inductor(index):
    """The real compiler gives the eager numbers; up to a minute per net on a 2-core CPU (inductor codegen)."""
    net, inputs, run = all_nets()[index]
    net = perturb(net).eval()
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True)
    torch.testing.assert_close(run(compiled, inputs), run(net, inputs), rtol=1e-4, atol=1e-5)


def test_full_res_path_starts_at_zero_runs_at_full_size_and_learns_per_pixel_work_faster():
    """`full_res_channels`: a stem and a residual head at full resolution around a folded net. Fresh, its
    output is zero; both run at the image's size; and it learns a per-pixel job (denoising: x_t with its
    noise known, the target a per-pixel function of x_t) faster than the folded net alone, which must carry each
    pixel through its 2 x 2 patches."""
    inputs = decoder_inputs()
    fresh = UNet(**TINY_DECODER, patch_size=2, full_res_channels=4).eval()
    assert torch.count_nonzero(run_unet(fresh, inputs)) == 0
    sizes = []
    for m in (fresh.stem, fresh.head):
        m.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:])))
    run_unet(fresh, inputs)
    assert sizes == [(32, 32), (32, 32)]
    with pytest.raises(ValueError, match="full_res_channels"):
        UNet(**TINY_DECODER, full_res_channels=4)

    def fit(net: UNet) -> float:
        torch.manual_seed(0)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for step in range(121):
            x = torch.randn(B, 3, 16, 16, generator=g)
            target = torch.sign(x) * x.abs().sqrt()  # a per-pixel map of x_t, different at every pixel
            loss = (run_unet(net, {**decoder_inputs(step, 16), "x_t": x}) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss)

    small = {**TINY_DECODER, "image_size": 16, "attention_resolutions": [4], "patch_size": 2}
    torch.manual_seed(0)
    folded = fit(UNet(**small))
    torch.manual_seed(0)
    with_path = fit(UNet(**small, full_res_channels=4))
    assert with_path < 0.5 * folded, (with_path, folded)
