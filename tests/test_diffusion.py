"""Diffusion math: forward process, targets, losses, samplers, guidance and inversion (plain tensors)."""

from __future__ import annotations

import pytest
import torch

from unclip.diffusion.embed_norm import EmbedNormalizer
from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.diffusion.sampling import ddim_invert, guided_denoiser, make_scheduler, sample_loop
from unclip.generate import DECODER_DROP, SamplerConfig, rerank


def oracle(diffusion: GaussianDiffusion, x0: torch.Tensor):
    """A perfect denoiser for a single known data point: returns the exact target at every (x_t, t)."""

    def net(x, t):
        a = diffusion.sqrt_alphas_cumprod[t].view(-1, *[1] * (x.ndim - 1))
        s = diffusion.sqrt_one_minus_alphas_cumprod[t].view(-1, *[1] * (x.ndim - 1))
        eps = (x - a * x0) / s
        return {"epsilon": eps, "sample": x0.expand_as(x), "v_prediction": a * eps - s * x0}[diffusion.prediction_type]

    return net


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_targets_and_x0_roundtrip(prediction_type):
    d = GaussianDiffusion(prediction_type=prediction_type)
    x0, noise = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x_t = d.q_sample(x0, t, noise)
    recovered = d.predict_x0(x_t, t, d.target(x0, noise, t))
    assert torch.allclose(recovered[:5], x0[:5], atol=1e-3)  # t=999 divides by sqrt(alpha_bar) ~ 6e-3


def test_schedules_match_diffusers_and_are_monotone():
    cos = GaussianDiffusion(beta_schedule="squaredcos_cap_v2")
    lin = GaussianDiffusion(beta_schedule="linear")
    for d in (cos, lin):
        ac = d.alphas_cumprod
        assert ac.shape == (1000,) and (ac[1:] < ac[:-1]).all() and ac[0] > 0.99 and ac[-1] < 0.01
        sched = d.make_scheduler("ddim")
        assert torch.allclose(sched.alphas_cumprod.float(), ac, atol=1e-6)
    assert not torch.allclose(cos.alphas_cumprod, lin.alphas_cumprod)


def test_min_snr_weights():
    t = torch.tensor([0, 500, 999])
    for pt in ("epsilon", "v_prediction", "sample"):
        d = GaussianDiffusion(prediction_type=pt, loss_weighting="min_snr", min_snr_gamma=5.0)
        w = d.loss_weight(t)
        assert torch.isfinite(w).all() and (w > 0).all()
    eps = GaussianDiffusion(prediction_type="epsilon", loss_weighting="min_snr").loss_weight(t)
    assert eps[0] < 0.01 and eps[2] == pytest.approx(1.0)  # high SNR down-weighted, low SNR untouched
    assert torch.equal(GaussianDiffusion().loss_weight(t), torch.ones(3))


def test_min_snr_floor_keeps_the_x0_weight_at_high_noise():
    """clamp(snr, 1, 5) for x_0: 1 (plain x_0-MSE) at high noise, 5 (min-SNR's cap) at low noise, snr between;
    the same weighting seen through v; the floor must lie in [0, gamma], and epsilon cannot take one."""
    t = torch.arange(1000)
    x0 = GaussianDiffusion(prediction_type="sample", loss_weighting="min_snr", min_snr_floor=1.0)
    w, snr = x0.loss_weight(t), x0.snr
    assert w[-1] == 1.0 and w[0] == 5.0 and torch.equal(w, snr.clamp(1.0, 5.0))
    assert torch.equal(GaussianDiffusion(prediction_type="sample", loss_weighting="min_snr").loss_weight(t)[-1:],
                       snr[-1:])  # without the floor the highest-noise step has almost no weight
    v = GaussianDiffusion(prediction_type="v_prediction", loss_weighting="min_snr", min_snr_floor=1.0)
    assert torch.allclose(v.loss_weight(t) * (snr + 1), w, rtol=1e-5)  # the same loss in x_0 units
    assert GaussianDiffusion.from_config(x0.config).min_snr_floor == 1.0
    with pytest.raises(ValueError, match="min_snr_floor"):
        GaussianDiffusion(prediction_type="sample", loss_weighting="min_snr", min_snr_floor=6.0)
    with pytest.raises(ValueError, match="unbounded at high noise"):
        GaussianDiffusion(prediction_type="epsilon", loss_weighting="min_snr", min_snr_floor=1.0)


def test_training_loss_is_zero_for_the_oracle_and_positive_otherwise():
    d = GaussianDiffusion(prediction_type="v_prediction")
    x0 = torch.randn(1, 2, 4, 4).expand(8, -1, -1, -1)
    loss = d.training_losses(oracle(d, x0[:1]), x0)["loss"]
    assert loss.shape == (8,) and loss.max() < 1e-6
    zero_net = lambda x, t: torch.zeros_like(x)  # noqa: E731
    assert d.training_losses(zero_net, x0)["loss"].min() > 0


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpmpp", "unipc", "diffusers.DEISMultistepScheduler"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_samplers_reach_the_data_point_with_a_perfect_denoiser(name, prediction_type):
    d = GaussianDiffusion(prediction_type=prediction_type)
    x0 = torch.randn(1, 3, 4, 4).clamp(-1, 1)
    out = sample_loop(oracle(d, x0), (2, 3, 4, 4), make_scheduler(name, **_sched(d)), 20,
                      generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 4, 4)
    assert (out - x0).abs().max() < 3e-2  # multistep solvers end on a low-order step


def _sched(d: GaussianDiffusion) -> dict:
    return {"num_train_timesteps": 1000, "beta_schedule": d.beta_schedule, "prediction_type": d.prediction_type}


def test_unknown_sampler_and_option_are_clear_errors():
    d = GaussianDiffusion()
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("heun9000", **_sched(d))
    with pytest.raises(ValueError, match="no option"):
        make_scheduler("ddim", **_sched(d), solver_order=3)


def test_thresholding_keeps_images_in_range():
    d = GaussianDiffusion(prediction_type="sample")
    wild = lambda x, t: torch.full_like(x, 5.0)  # noqa: E731  (predicts x0 far outside [-1, 1])
    for mode in ("static", "dynamic"):
        sched = d.make_scheduler("ddim", thresholding=mode)
        out = sample_loop(wild, (2, 3, 4, 4), sched, 10, generator=torch.Generator().manual_seed(0))
        assert out.abs().max() <= (1.0 if mode == "static" else 3.0) + 1e-5


def test_ddim_is_deterministic_and_seeded_samplers_repeat():
    d = GaussianDiffusion()
    net = lambda x, t: 0.1 * x  # noqa: E731
    runs = [sample_loop(net, (2, 3, 4, 4), d.make_scheduler("ddim"), 10, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert torch.equal(*runs)
    other = sample_loop(net, (2, 3, 4, 4), d.make_scheduler("ddim"), 10, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(runs[0], other)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    ddpm = [sample_loop(net, (2, 3, 4, 4), d.make_scheduler("ddpm"), 10, generator=gens()) for _ in range(2)]
    assert torch.equal(*ddpm)


def test_per_sample_seeds_do_not_depend_on_the_batch():
    d = GaussianDiffusion()
    net = lambda x, t: 0.1 * x  # noqa: E731
    alone = sample_loop(net, (1, 3, 4, 4), d.make_scheduler("ddim"), 5, generator=[torch.Generator().manual_seed(7)])
    both = sample_loop(net, (2, 3, 4, 4), d.make_scheduler("ddim"), 5,
                       generator=[torch.Generator().manual_seed(9), torch.Generator().manual_seed(7)])
    assert torch.allclose(alone[0], both[1])


def test_guidance_batches_both_branches_on_the_same_x_t():
    seen = []

    def net(x, t, *, c, drop=None):
        drop = torch.zeros(x.shape[0], dtype=torch.bool) if drop is None else drop
        seen.append((x.clone(), drop.clone()))
        return torch.where(drop[:, None], torch.zeros_like(x), c) + x

    x, t, c = torch.randn(3, 2), torch.zeros(3, dtype=torch.long), torch.ones(3, 2)
    out = guided_denoiser(net, {"c": c}, ["drop"], cond_scale=3.0)(x, t)
    assert len(seen) == 1  # one batched forward
    xs, drop = seen[0]
    assert torch.equal(xs[:3], x) and torch.equal(xs[3:], x)  # the unconditional branch sees x_t
    assert drop.tolist() == [False] * 3 + [True] * 3
    assert torch.allclose(out, x + 3.0 * c)  # uncond + s * (cond - uncond)
    assert torch.allclose(guided_denoiser(net, {"c": c}, ["drop"], 1.0)(x, t), x + c)


def test_nested_guidance_scales_each_condition_given_the_ones_before_it():
    """Two conditions, an image term a and a caption term b that the net adds to x when kept: with scales
    (s_i, s_t) the output is x + s_i a + s_t b (c_0 = x, c_1 = x + a, c_2 = x + a + b), from one forward of
    three branches; equal scales are the two-branch rule."""
    seen = []

    def net(x, t, *, a, b, drop_a, drop_b):
        seen.append((drop_a.tolist(), drop_b.tolist()))
        return x + torch.where(drop_a[:, None], 0.0, a) + torch.where(drop_b[:, None], 0.0, b)

    x, t = torch.randn(2, 3), torch.zeros(2, dtype=torch.long)
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    out = guided_denoiser(net, {"a": a, "b": b}, ["drop_a", "drop_b"], [2.0, 5.0])(x, t)
    assert torch.allclose(out, x + 2.0 * a + 5.0 * b, atol=1e-5)
    assert seen == [([False] * 4 + [True] * 2, [False] * 2 + [True] * 4)]  # [c_2; c_1; c_0] in one forward
    seen.clear()
    same = guided_denoiser(net, {"a": a, "b": b}, ["drop_a", "drop_b"], [3.0, 3.0])(x, t)
    assert torch.allclose(same, x + 3.0 * (a + b), atol=1e-5) and len(seen[0][0]) == 4  # two branches
    with pytest.raises(ValueError, match="one per drop mask"):
        guided_denoiser(net, {"a": a, "b": b}, ["drop_a", "drop_b"], [1.0, 2.0, 3.0])
    # the decoder's settings: text_scale guides the caption (last mask); without it one scale for both
    sampler = SamplerConfig(cond_scale=2.0, text_scale=5.0)
    assert sampler.guidance(DECODER_DROP) == [2.0, 5.0] and SamplerConfig(cond_scale=2.0).guidance(DECODER_DROP) == 2.0
    with pytest.raises(ValueError, match="samples without one"):  # a decoder without caption conditioning
        sampler.guidance(DECODER_DROP[:1])
    with pytest.raises(ValueError, match="must come last"):
        sampler.guidance(DECODER_DROP[::-1])


def test_ddim_inversion_reconstructs_with_a_perfect_denoiser():
    for pt in ("epsilon", "v_prediction"):
        d = GaussianDiffusion(prediction_type=pt)
        x0 = torch.randn(2, 3, 4, 4)
        x_T = ddim_invert(oracle(d, x0), x0, d.config, 25)
        rec = sample_loop(oracle(d, x0), x0.shape, d.make_scheduler("ddim"), 25, x_T=x_T)
        assert torch.allclose(rec, x0, atol=1e-3)


def test_embed_normalizer_roundtrip_and_errors():
    e = torch.randn(4, 16)
    l2 = EmbedNormalizer(16, "l2")
    assert torch.allclose(l2.encode(e).pow(2).sum(-1), torch.full((4,), 16.0), atol=1e-4)
    assert torch.allclose(l2.decode(l2.encode(e)), torch.nn.functional.normalize(e, dim=-1), atol=1e-6)
    st = EmbedNormalizer(16, "standardize", [0.1] * 16, [0.5] * 16)
    assert torch.allclose(st.decode(st.encode(e)), torch.nn.functional.normalize(e, dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="embed_stats"):
        EmbedNormalizer(16, "standardize")
    with pytest.raises(ValueError, match="dims"):
        EmbedNormalizer(16, "standardize", [0.0] * 8, [1.0] * 8)


def test_rerank_picks_the_candidate_closest_to_the_text():
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    cands = torch.nn.functional.normalize(torch.randn(3, 4, 8), dim=-1)
    cands[1, 2] = text[1]
    cands[0, 3] = text[0]
    best = rerank(cands, text)
    assert torch.equal(best[1], text[1]) and torch.equal(best[0], text[0])
    scores = torch.einsum("bnd,bd->bn", cands, text)
    assert torch.equal(best[2], cands[2, scores[2].argmax()])


def test_sampler_config_merges_defaults():
    cfg = SamplerConfig.from_any({"num_steps": 12, "cond_scale": None}, name="dpmpp", cond_scale=2.0)
    assert (cfg.name, cfg.num_steps, cfg.cond_scale) == ("dpmpp", 12, 2.0)


# ---------------------------------------------------------------------------------------- learned variance
def test_discretized_likelihood_is_a_distribution_over_the_256_levels():
    from unclip.diffusion.gaussian import discretized_gaussian_log_likelihood

    levels = torch.linspace(-1, 1, 256).view(256, 1)
    for mean, log_var in [(0.3, -6.0), (-0.99, -2.0), (1.4, 0.5)]:
        p = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                                torch.full_like(levels, log_var)).exp()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-4)
        if log_var < -5:  # narrow: the mass sits on the level nearest the mean
            assert levels[p.argmax()].item() == pytest.approx(mean, abs=1 / 255 + 1e-6)


def test_vlb_term_is_the_gaussian_kl_and_the_decoder_nll():
    d = GaussianDiffusion(prediction_type="v_prediction", learn_sigma=True)
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    x_t = torch.randn(3, 3, 4, 4)
    t = torch.tensor([10, 500, 999])
    # Exact mean and v = -1 (the true posterior variance): KL = 0.
    assert d.vlb_term(x0, x_t, t, x0, -torch.ones_like(x0)).abs().max() < 1e-5
    # Exact mean and v = +1 (variance beta_t): KL = (-1 + log r + 1 / r) / 2 per dim, r = beta_t / beta~_t.
    log_r = d.log_betas[t] - d.posterior_log_var[t]
    expected = 0.5 * (-1 + log_r + torch.exp(-log_r)) / torch.log(torch.tensor(2.0))
    torch.testing.assert_close(d.vlb_term(x0, x_t, t, x0, torch.ones_like(x0)), expected, rtol=1e-4, atol=1e-6)
    # t = 0: the discretised NLL of x0, about a bit per dim for an exact mean (the variance, beta~_1, spans about
    # a bin), far more for a wrong one.
    grid = torch.round((x0 + 1) * 127.5) / 127.5 - 1
    t0 = torch.zeros(3, dtype=torch.long)
    exact = d.vlb_term(grid, x_t, t0, grid, -torch.ones_like(x0))
    off = d.vlb_term(grid, x_t, t0, -grid, -torch.ones_like(x0))
    assert (exact < 1.0).all() and (off > 5.0).all()


def test_hybrid_loss_trains_the_variance_only_through_the_vlb_and_stays_bounded():
    d = GaussianDiffusion(prediction_type="v_prediction", learn_sigma=True, vlb_clamp=10.0)
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    t = torch.tensor([0, 1, 2, 700])
    out = torch.zeros(4, 6, 4, 4, requires_grad=True)
    losses = d.training_losses(lambda x, t: out * 1.0, x0, t=t)
    losses["loss"].sum().backward()
    plain = GaussianDiffusion(prediction_type="v_prediction")
    assert out.grad[:, 3:].abs().sum() > 0  # the variance channels learn from L_vlb
    # A wildly wrong mean at small t: the VLB term is bounded by the clamp, and the loss is finite.
    wild = torch.cat([torch.full((4, 3, 4, 4), 50.0), -torch.ones(4, 3, 4, 4)], dim=1)
    noise = torch.randn_like(x0)
    res = d.training_losses(lambda x, t: wild, x0, t=t, noise=noise)
    assert torch.isfinite(res["loss"]).all() and res["vlb"].max() > 10.0
    mse_only = plain.training_losses(lambda x, t: wild[:, :3], x0, t=t, noise=noise)["loss"]
    torch.testing.assert_close(res["loss"], mse_only + d.vlb_weight * res["vlb"].clamp(max=10.0))
    assert (res["loss"] <= mse_only + d.vlb_weight * 10.0 + 1e-3).all()


def test_vlb_gradient_never_reaches_the_mean():
    d = GaussianDiffusion(prediction_type="epsilon", learn_sigma=True, vlb_weight=1.0)
    x0, noise, t = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4), torch.tensor([3, 400])
    out = torch.randn(2, 6, 4, 4, requires_grad=True)
    d.training_losses(lambda x, t: out * 1.0, x0, t=t, noise=noise)["loss"].sum().backward()
    mean = out.detach()[:, :3].clone().requires_grad_(True)
    GaussianDiffusion(prediction_type="epsilon").training_losses(lambda x, t: mean * 1.0, x0, t=t,
                                                                 noise=noise)["loss"].sum().backward()
    torch.testing.assert_close(out.grad[:, :3], mean.grad)  # the mean's gradient is L_simple's alone


def test_learned_variance_samplers_and_guidance():
    d = GaussianDiffusion(prediction_type="v_prediction", learn_sigma=True)
    x0 = torch.randn(1, 3, 4, 4).clamp(-1, 1)
    perfect = oracle(d, x0)

    def net(x, t, **cond):
        return torch.cat([perfect(x, t), torch.zeros_like(x)], dim=1)  # v = 0: halfway between the variances

    for name in ("ddpm", "ddim", "dpmpp"):
        scheduler = d.make_scheduler(name)
        assert (getattr(scheduler.config, "variance_type", None) == "learned_range") == (name == "ddpm")
        out = sample_loop(net, (2, 3, 4, 4), scheduler, 20, generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 3, 4, 4) and (out - x0).abs().max() < 3e-2
    # Guidance extrapolates the mean; the variance is the conditional branch's.
    def branch_net(x, t, drop):
        sign = torch.where(drop, -1.0, 1.0).view(-1, 1, 1, 1)
        return torch.cat([sign * torch.ones_like(x), 0.5 * sign * torch.ones_like(x)], dim=1)

    guided = guided_denoiser(branch_net, {}, ["drop"], cond_scale=3.0)(torch.zeros(2, 3, 4, 4), torch.zeros(2))
    assert guided.shape == (2, 6, 4, 4)
    assert torch.all(guided[:, :3] == 5.0) and torch.all(guided[:, 3:] == 0.5)


def test_learn_sigma_needs_a_six_channel_net():
    d = GaussianDiffusion(learn_sigma=True)
    with pytest.raises(ValueError, match="2 x 3 output channels"):
        d.training_losses(lambda x, t: x, torch.zeros(2, 3, 4, 4))


def gaussian_classes_denoiser(diffusion: GaussianDiffusion, means: torch.Tensor, std: float):
    """The exact v-prediction denoiser of data x_0 ~ N(means[c], std^2 I) per class c, and of their equal
    mixture (the unconditional model), for classifier-free guidance tests.

    means (K, *shape). The net takes `cond_drop_mask` (B,) and `label` (B,): dropped rows get the mixture.
    """

    def net(x, t, label, cond_drop_mask=None):
        a = diffusion.sqrt_alphas_cumprod[t].view(-1, *[1] * (x.ndim - 1))
        s = diffusion.sqrt_one_minus_alphas_cumprod[t].view(-1, *[1] * (x.ndim - 1))
        var = a**2 * std**2 + s**2  # marginal variance of x_t per pixel
        mu = a[:, None] * means[None]  # (B, K, *shape): each class's mean of x_t
        log_p = -((x[:, None] - mu) ** 2).flatten(2).sum(-1) / (2 * var.flatten(1))  # (B, K)
        weights = torch.softmax(log_p, dim=1)  # posterior over classes (the mixture)
        if cond_drop_mask is not None:
            onehot = torch.nn.functional.one_hot(label, means.shape[0]).to(x.dtype)
            weights = torch.where(cond_drop_mask[:, None], weights, onehot)
        else:
            weights = torch.nn.functional.one_hot(label, means.shape[0]).to(x.dtype)
        # E[x_0 | x_t, c] for a Gaussian class: mean + a std^2 / var (x_t - a mean)
        x0_given = means[None] + (a * std**2 / var)[:, None] * (x[:, None] - mu)  # (B, K, *shape)
        x0 = (weights.view(*weights.shape, *[1] * (x.ndim - 1)) * x0_given).sum(1)
        eps = (x - a * x0) / s
        return a * eps - s * x0

    return net


@pytest.mark.parametrize("thresholding", ["none", "static", "dynamic"])
@pytest.mark.parametrize("name", ["ddim", "dpmpp", "unipc"])
def test_guided_samplers_agree_on_an_exact_class_conditional_denoiser(name, thresholding):
    """Guidance 3 on two Gaussian classes (means +-0.4, std 0.3, all inside [-1, 1]) with the exact denoiser:
    every sampler, with or without x_0 thresholding, must give each class its own side and about its mean
    and spread. A sampler that thresholds x_0 but keeps the raw noise estimate (DDIM without
    use_clipped_model_output) drifts to the other class: mean 0.02, 41% of pixels on the wrong side."""
    d = GaussianDiffusion(prediction_type="v_prediction")
    means = torch.stack([torch.full((3, 4, 4), 0.4), torch.full((3, 4, 4), -0.4)])
    net = gaussian_classes_denoiser(d, means, std=0.3)
    label = torch.tensor([0, 1] * 8)
    denoise = guided_denoiser(net, {"label": label}, ("cond_drop_mask",), cond_scale=3.0)
    sched = d.make_scheduler(name, thresholding=thresholding)
    out = sample_loop(denoise, (16, 3, 4, 4), sched, 50, generator=torch.Generator().manual_seed(0))
    own_side = out * torch.tensor([1.0, -1.0] * 8).view(16, 1, 1, 1)  # > 0: the class's side
    assert (own_side < 0).float().mean() < 0.15
    assert 0.3 < own_side.mean() < 0.5 and own_side.std() < 0.4


def test_timestep_shift_moves_training_toward_high_noise():
    g = torch.Generator().manual_seed(0)
    uniform = GaussianDiffusion().sample_timesteps(200_000, torch.device("cpu"), generator=g)
    shifted_d = GaussianDiffusion(timestep_shift=3.0)
    shifted = shifted_d.sample_timesteps(200_000, torch.device("cpu"), generator=g)
    assert shifted.min() >= 0 and shifted.max() <= 999 and shifted.dtype == torch.int64
    assert abs(float((uniform >= 900).float().mean()) - 0.10) < 0.01
    assert abs(float((shifted >= 900).float().mean()) - 0.25) < 0.01  # u > 3/4 maps above 0.9
    assert abs(float((shifted < 200).float().mean()) - 0.2 / 2.6) < 0.01  # low noise is still trained
    assert GaussianDiffusion.from_config(shifted_d.config).timestep_shift == 3.0
    with pytest.raises(ValueError, match="timestep_shift"):
        GaussianDiffusion(timestep_shift=0.0)


def test_sigma_data_preconditioning_is_v_prediction_at_one_and_passes_x_t_through_at_low_noise():
    x0, noise = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    t = torch.tensor([0, 20, 100, 500, 900, 999])
    v = GaussianDiffusion(prediction_type="v_prediction")
    edm1 = GaussianDiffusion(prediction_type="sample", sigma_data=1.0)
    x_t = v.q_sample(x0, t, noise)
    assert torch.allclose(edm1.target(x0, noise, t), -v.target(x0, noise, t), atol=1e-4)  # F = -v
    d = GaussianDiffusion(prediction_type="sample", sigma_data=0.25)
    assert torch.allclose(d.predict_x0(x_t, t, d.target(x0, noise, t)), x0, atol=1e-3)  # every t, t=999 too
    # a net that outputs nothing: its x_0 is x_t itself at low noise and nothing at high noise
    passed = d.predict_x0(x_t, t, torch.zeros_like(x_t))
    assert (passed[:2] - x0[:2]).abs().mean() < 0.04 and passed[5].abs().max() < 1e-3
    # the loss is the MSE on the preconditioned output: the oracle's is 0, x_0-MSE weighted by 1 / c_out^2
    loss = d.training_losses(lambda x, tt: d.target(x0, noise, tt), x0, t=t, noise=noise)["loss"]
    assert loss.max() < 1e-8
    zero = d.training_losses(lambda x, tt: torch.zeros_like(x), x0, t=t, noise=noise)["loss"]
    x0_mse = (passed - x0).pow(2).flatten(1).mean(1)
    assert torch.allclose(zero, x0_mse / d.skip_out[t] ** 2, rtol=1e-3)
    assert GaussianDiffusion.from_config(d.config).sigma_data == 0.25
    for bad in (dict(prediction_type="v_prediction", sigma_data=0.5), dict(prediction_type="sample", sigma_data=-1),
                dict(prediction_type="sample", sigma_data=0.5, loss_weighting="min_snr")):
        with pytest.raises(ValueError, match="sigma_data"):
            GaussianDiffusion(**bad)


@pytest.mark.parametrize("name", ["ddim", "dpmpp", "unipc"])
def test_samplers_read_a_preconditioned_net_with_guidance(name):
    """The exact class-conditional denoiser written as a sigma_data = 0.25 net: with the sampler reading its
    output through `as_prediction`, guided sampling gives each class its own side, as for the v-net."""
    v = GaussianDiffusion(prediction_type="v_prediction")
    d = GaussianDiffusion(prediction_type="sample", sigma_data=0.25)
    means = torch.stack([torch.full((3, 4, 4), 0.4), torch.full((3, 4, 4), -0.4)])
    v_net = gaussian_classes_denoiser(v, means, std=0.3)

    def net(x, t, label, cond_drop_mask=None):  # F such that the preconditioned reading is the exact x_0
        x0 = v.predict_x0(x, t, v_net(x, t, label, cond_drop_mask))
        return (x0 - d.skip_xt[t].view(-1, 1, 1, 1) * x) / d.skip_out[t].view(-1, 1, 1, 1)

    label = torch.tensor([0, 1] * 8)
    denoise = d.as_prediction(guided_denoiser(net, {"label": label}, ("cond_drop_mask",), cond_scale=3.0))
    out = sample_loop(denoise, (16, 3, 4, 4), d.make_scheduler(name, thresholding="static"), 50,
                      generator=torch.Generator().manual_seed(0))
    own_side = out * torch.tensor([1.0, -1.0] * 8).view(16, 1, 1, 1)
    assert (own_side < 0).float().mean() < 0.15
    assert 0.3 < own_side.mean() < 0.5 and own_side.std() < 0.4
    raw = sample_loop(guided_denoiser(net, {"label": label}, ("cond_drop_mask",), cond_scale=3.0), (16, 3, 4, 4),
                      d.make_scheduler(name, thresholding="static"), 50, generator=torch.Generator().manual_seed(0))
    assert (raw - out).abs().mean() > 0.05  # the output read as plain x_0 is another (wrong) model


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction", "epsilon"])
def test_edge_loss_weighs_outlines_not_flat_colour_in_every_parametrisation(prediction_type):
    """edge_loss_weight lambda adds the MSE of the x_0 error's finite differences: a flat error (a colour off
    by a constant) gains nothing, a checkerboard error (the highest frequency) 1 + 8 lambda times its weight
    (each difference (2a)^2, on both axes), the same for every prediction type; the exact denoiser scores 0."""
    lam = 2.0
    d_on = GaussianDiffusion(prediction_type=prediction_type, edge_loss_weight=lam)
    d_off = GaussianDiffusion(prediction_type=prediction_type)
    x0, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t = torch.tensor([50, 400, 800])
    a = d_on.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    s = d_on.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    to_output = {"sample": 1.0, "v_prediction": -1.0 / s, "epsilon": -a / s}[prediction_type]  # d out / d x_0

    def loss(d, x0_error):
        net = lambda x, tt: d.target(x0, noise, tt) + to_output * x0_error  # noqa: E731
        return d.training_losses(net, x0, t=t, noise=noise)["loss"]

    assert loss(d_on, torch.zeros_like(x0)).max() < 1e-8
    flat = torch.full_like(x0, 0.1)
    assert torch.allclose(loss(d_on, flat), loss(d_off, flat), rtol=1e-4)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    checker = 0.1 * (-1.0) ** (i + j).float().expand_as(x0)
    assert torch.allclose(loss(d_on, checker) / loss(d_off, checker), torch.full((3,), 1 + 8 * lam), rtol=1e-3)
    assert GaussianDiffusion.from_config(d_on.config).edge_loss_weight == lam
    with pytest.raises(ValueError, match="edge_loss_weight"):
        GaussianDiffusion(edge_loss_weight=-1.0)
    with pytest.raises(ValueError, match="edge_loss_weight is for images"):  # a prior's embeddings (B, D)
        d_on.training_losses(lambda x, tt: x, torch.randn(3, 8))
