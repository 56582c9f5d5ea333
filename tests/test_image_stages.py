"""Decoder and upsamplers: guidance paths, corruption, aligned crops, overfitting, samplers, EMA samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unclip.data.degradation import bsr_degrade, gaussian_blur_aug, paired_random_crop
from unclip.data.shapes import make_sample
from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.diffusion.sampling import guided_denoiser
from unclip.generate import DECODER_DROP, SamplerConfig, sample_images
from unclip.nets import UNet
from unclip.nets.unet import resize_lowres
from unclip.systems.image import DecoderSystem, UpsamplerSystem, psnr

D = 32


def decoder_net(size: int = 16, text: bool = True) -> UNet:
    return UNet(image_size=size, model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[8],
                num_head_channels=16, image_embed_dim=D, text_token_dim=D if text else None)


def upsampler_net(size: int = 32) -> UNet:
    return UNet(image_size=size, model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[],
                lowres_cond=True, noise_level_cond=True)


def nonzero_(net):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def shapes_images(n: int, size: int) -> torch.Tensor:
    out = []
    for i in range(n):
        img, _, _ = make_sample(0, "train", i, image_size=size)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def decoder_cond(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image_embed": F.normalize(torch.randn(b, D, generator=g), dim=-1),
            "text_tokens": torch.randn(b, 6, D, generator=g), "text_mask": torch.ones(b, 6, dtype=torch.bool)}


def test_stage_outputs_have_the_right_shapes():
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 900])
    assert decoder_net()(x, t, **decoder_cond(2)).shape == (2, 3, 16, 16)
    assert decoder_net(text=False)(x, t, image_embed=decoder_cond(2)["image_embed"]).shape == (2, 3, 16, 16)
    up = upsampler_net(32)
    out = up(torch.randn(2, 3, 32, 32), t, lowres_image=torch.randn(2, 3, 8, 8), noise_level=torch.tensor([0, 5]))
    assert out.shape == (2, 3, 32, 32)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output layers


def test_dropping_all_conditioning_is_the_null_path_and_scale_one_is_conditional():
    net = nonzero_(decoder_net())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    ones = torch.ones(2, dtype=torch.bool)
    drops = {"image_embed_drop_mask": ones, "text_drop_mask": ones}
    null_a, null_b = net(x, t, **decoder_cond(2, 0), **drops), net(x, t, **decoder_cond(2, 1), **drops)
    assert torch.allclose(null_a, null_b, atol=1e-5)
    cond = decoder_cond(2)
    assert torch.allclose(guided_denoiser(net, cond, DECODER_DROP, 1.0)(x, t), net(x, t, **cond), atol=1e-6)
    guided = guided_denoiser(net, cond, DECODER_DROP, 4.0)(x, t)
    assert torch.allclose(guided, null_a + 4.0 * (net(x, t, **cond) - null_a), atol=1e-4)


def test_corruptions_keep_shape_and_range():
    x = shapes_images(4, 32)
    for out in (gaussian_blur_aug(x, prob=1.0), bsr_degrade(x, prob=1.0)):
        assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
        assert not torch.equal(out, x)
    assert torch.equal(gaussian_blur_aug(x, prob=0.0), x)


def test_upsampler_random_crops_align_target_and_conditioning():
    # An image whose pixels encode their own coordinates: aligned crops agree exactly.
    h = w = 64
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([ys, xs, ys + xs]).float()[None].repeat(5, 1, 1, 1)
    a, b = paired_random_crop(coords, coords.clone(), 16, generator=torch.Generator().manual_seed(0))
    assert a.shape == (5, 3, 16, 16) and torch.equal(a, b)
    assert len({(int(c[0, 0, 0]), int(c[1, 0, 0])) for c in a}) > 1  # per-sample offsets
    assert torch.equal(a[:, 0, 1:, :] - a[:, 0, :-1, :], torch.ones(5, 15, 16))  # contiguous rows

    # Through the upsampler system: the crop of the upsampled low-res input lines up with the target's crop.
    system = UpsamplerSystem(upsampler_net(64), GaussianDiffusion(), lowres_size=16, degradation="none")
    image = shapes_images(4, 64)
    x0, cond = system.training_inputs({"image": image, "caption": [""] * 4}, train=True)
    assert x0.shape == (4, 3, 16, 16) and cond["lowres_image"].shape == (4, 3, 16, 16)
    assert (x0 - cond["lowres_image"]).abs().mean() < 0.3  # same region, blurrier
    shuffled = cond["lowres_image"].roll(1, dims=0)
    assert (x0 - cond["lowres_image"]).abs().mean() < (x0 - shuffled).abs().mean()


def test_tiny_decoder_overfits_four_images():
    torch.manual_seed(0)
    net = decoder_net(text=False)
    diffusion = GaussianDiffusion(prediction_type="v_prediction", loss_weighting="min_snr")
    x = shapes_images(4, 16)
    embed = F.normalize(torch.randn(4, D), dim=-1)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(240):
        loss = diffusion.training_losses(net, x, image_embed=embed)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-30:]) < np.mean(losses[:10]) / 10


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpmpp"])
def test_samplers_return_images_in_range(name):
    net = nonzero_(decoder_net())
    diffusion = GaussianDiffusion(prediction_type="v_prediction")
    cfg = SamplerConfig(name=name, num_steps=6, cond_scale=3.0, thresholding="dynamic")
    out = sample_images(net, diffusion, decoder_cond(3), (3, 3, 16, 16), cfg, seeds=[0, 1, 2])
    assert out.shape == (3, 3, 16, 16) and out.min() >= -1 and out.max() <= 1 and torch.isfinite(out).all()


def test_ddim_eta_zero_is_deterministic_and_eta_one_is_seeded():
    net = nonzero_(decoder_net())
    diffusion = GaussianDiffusion(prediction_type="v_prediction")
    x_T = torch.randn(2, 3, 16, 16)
    run = lambda cfg, seeds: sample_images(net, diffusion, decoder_cond(2), (2, 3, 16, 16), cfg, seeds=seeds,  # noqa: E731
                                           x_T=x_T)
    det = SamplerConfig(num_steps=6, eta=0.0)
    assert torch.equal(run(det, [0, 1]), run(det, [5, 6]))  # from the same x_T, eta = 0 ignores the seed
    sto = SamplerConfig(num_steps=6, eta=1.0)
    assert torch.equal(run(sto, [0, 1]), run(sto, [0, 1])) and not torch.equal(run(sto, [0, 1]), run(sto, [5, 6]))


def test_decoder_system_validates_its_configuration():
    with pytest.raises(ValueError, match="image_embed_dim"):
        DecoderSystem(upsampler_net(), GaussianDiffusion())
    with pytest.raises(ValueError, match="lowres_cond"):
        UpsamplerSystem(decoder_net(), GaussianDiffusion())
    with pytest.raises(ValueError, match="noise_level_cond"):
        UpsamplerSystem(UNet(image_size=32, model_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                             attention_resolutions=[], lowres_cond=True), GaussianDiffusion(), noise_aug_max_level=100)
    system = DecoderSystem(decoder_net(16), GaussianDiffusion())
    with pytest.raises(ValueError, match="data.image_size=16"):
        system.training_inputs({"image": torch.zeros(1, 3, 32, 32), "caption": ["x"], "image_embed": torch.zeros(1, D),
                                "text_tokens": torch.zeros(1, 4, D), "text_mask": torch.ones(1, 4, dtype=torch.bool)},
                               train=True)


def test_psnr_and_upsampler_resize():
    a = torch.rand(2, 3, 8, 8) * 2 - 1
    assert psnr(a, a).min() > 90 and psnr(a, -a).max() < 20
    low = torch.rand(1, 3, 8, 8)
    assert resize_lowres(low, (8, 8)) is low and resize_lowres(low, (32, 32)).shape == (1, 3, 32, 32)


def test_samples_come_from_the_ema_weights(tmp_path, compose_cfg):
    """The validation grid is sampled while Lightning's weight averaging has the EMA weights in place."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from unclip.callbacks import EMA

    cfg = compose_cfg("train", ["experiment=tiny_decoder", "trainer.max_steps=4"], tmp_path)
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    ema = EMA(decay=0.9)
    seen = {}
    original = model.sample_batch

    def spy(batch, seeds):
        seen.update({k: v.clone() for k, v in model.net.state_dict().items()})
        return original(batch, seeds)

    model.sample_batch = spy
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, val_check_interval=4, check_val_every_n_epoch=None,
                         limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, callbacks=[ema], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    averaged = {k[len("module.net."):]: v for k, v in ema._average_model.state_dict().items()
                if k.startswith("module.net.")}
    assert seen and all(torch.equal(seen[k], averaged[k]) for k in averaged)
    assert (tmp_path / "samples" / "decoder_step0000004.png").is_file()


def test_upsampler_conditioning_noise_is_drawn_at_the_target_size():
    from unclip.generate import upsampler_cond

    diffusion = GaussianDiffusion()
    lowres = torch.zeros(2, 3, 8, 8)
    cond = upsampler_cond(lowres, 32, diffusion, 500, seeds=[0, 1])
    assert cond["lowres_image"].shape == (2, 3, 32, 32) and cond["noise_level"].tolist() == [500, 500]
    noise = cond["lowres_image"] / diffusion.sqrt_one_minus_alphas_cumprod[500]
    assert abs(float(noise.std()) - 1.0) < 0.05  # i.i.d. unit noise at full size, not upsampled 8 px noise
    neighbours = torch.corrcoef(torch.stack([noise[..., :-1].flatten(), noise[..., 1:].flatten()]))[0, 1]
    assert abs(float(neighbours)) < 0.1
    again = upsampler_cond(lowres, 32, diffusion, 500, seeds=[0, 1])
    assert torch.equal(again["lowres_image"], cond["lowres_image"])  # per-sample seeds
    assert torch.equal(upsampler_cond(lowres, 32)["lowres_image"], torch.zeros(2, 3, 32, 32))  # no augmentation


def test_the_upsampler_baseline_is_bicubic():
    from unclip.systems.image import bicubic_upsample

    low = torch.rand(2, 3, 8, 8) * 2 - 1
    expected = F.interpolate(low, size=(32, 32), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert torch.equal(bicubic_upsample(low, 32), expected)
    assert not torch.allclose(bicubic_upsample(low, 32), resize_lowres(low, (32, 32)))  # the net's own is bilinear


def test_learned_variance_decoder_trains_validates_and_decodes(tmp_path, data_dir):
    """model.diffusion.learn_sigma=true: a 6-channel net (set by the config), the hybrid loss, validation
    samples through ancestral DDPM with the learned variance, and a checkpoint whose pipeline decodes
    3-channel images in range."""
    sampler = "ddpm"
    from tests.conftest import train_stage
    from unclip.pipeline import LoadedStage, UnCLIPPipeline

    result = train_stage("tiny_decoder", tmp_path / "run", data_dir, [
        "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.log_every_n_steps=1",
        "model.diffusion.learn_sigma=true",
        f"model.sampler.name={sampler}", "model.sampler.num_steps=5",
        "callbacks.model_checkpoint.every_n_train_steps=4"])
    stage = LoadedStage.load(result["checkpoint"], "decoder")
    assert stage.diffusion.learn_sigma and stage.net.config["out_channels"] == 6
    metrics = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/vlb" in metrics.splitlines()[0]
    pipe = UnCLIPPipeline.from_checkpoints(decoder=result["checkpoint"], device="cpu")
    embeds = F.normalize(torch.randn(2, stage.net.config["image_embed_dim"]), dim=-1)
    text = {k: v for k, v in pipe.encode_text(["a red circle", "a blue square"]).items()}
    images = pipe.decode(embeds, text, seeds=[0, 1], sampler=SamplerConfig(name=sampler, num_steps=5))
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1


def test_residual_upsampler_starts_at_the_resized_input_and_learns_the_difference():
    """residual=True: the target is x0 - resize(lowres); with x_0 prediction a freshly built (zero-output) net
    already upsamples to the resized low-resolution image through the shared sampling path, and training
    adds the detail that resizing lacks."""
    from unclip.generate import upsample_images

    diffusion = GaussianDiffusion(prediction_type="sample")
    system = UpsamplerSystem(upsampler_net(32), diffusion, lowres_size=16, residual=True, degradation="none",
                             train_crop_size=32)
    images = shapes_images(8, 32)
    lowres = system.get_lowres({"image": images})
    x0, cond = system.training_inputs({"image": images}, train=False)
    torch.testing.assert_close(x0, images - resize_lowres(lowres, (32, 32)))
    sampler = SamplerConfig(name="ddim", num_steps=10, thresholding="none")
    level = system.sample_noise_level
    fresh = upsample_images(system.net, diffusion, lowres, 32, sampler, level, residual=True, seeds=list(range(8)))
    torch.testing.assert_close(fresh, resize_lowres(lowres, (32, 32)).clamp(-1, 1))
    torch.testing.assert_close(system.sample_batch({"image": images}, list(range(8))), fresh)
    base = float(psnr(fresh, images).mean())
    torch.manual_seed(0)
    opt = torch.optim.Adam(system.net.parameters(), lr=3e-3)
    for _ in range(150):
        x0, cond = system.training_inputs({"image": images}, train=True)
        loss = diffusion.training_losses(system.net, x0, **cond)["loss"].mean()
        opt.zero_grad(), loss.backward(), opt.step()
    trained = upsample_images(system.net.eval(), diffusion, lowres, 32, sampler, level, residual=True,
                              seeds=list(range(8)))
    assert float(psnr(trained, images).mean()) > base + 1.0
