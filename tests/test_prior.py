"""The prior stage: guidance paths, overfitting, deterministic sampling, reranking, EMA at validation."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from unclip.diffusion.embed_norm import EmbedNormalizer
from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.diffusion.sampling import guided_denoiser
from unclip.generate import PRIOR_DROP, SamplerConfig, sample_image_embeds
from unclip.nets import PriorTransformer
from unclip.systems.prior import PriorSystem, embedding_metrics

D, L, W = 32, 8, 32


def make_net(width: int = 64) -> PriorTransformer:
    return PriorTransformer(embed_dim=D, text_token_dim=W, num_text_tokens=L, width=width, depth=2, heads=4)


def conditioning(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[:, 5:] = False
    return {"text_embed": F.normalize(torch.randn(b, D, generator=g), dim=-1),
            "text_tokens": torch.randn(b, L, W, generator=g), "text_mask": mask}


def nonzero_(net: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_all_dropped_conditioning_is_the_null_path_and_still_sees_x_t():
    net = nonzero_(make_net()).eval()
    x, t = torch.randn(4, D), torch.randint(0, 1000, (4,))
    a, b = conditioning(4, 0), conditioning(4, 1)
    drop = torch.ones(4, dtype=torch.bool)
    null_a, null_b = net(x, t, **a, cond_drop_mask=drop), net(x, t, **b, cond_drop_mask=drop)
    assert torch.allclose(null_a, null_b, atol=1e-6)  # the text passed no longer matters
    assert not torch.allclose(null_a, net(x, t, **a), atol=1e-4)
    assert not torch.allclose(null_a, net(x + 1, t, **a, cond_drop_mask=drop), atol=1e-4)  # but x_t does


def test_cond_drop_prob_one_drops_every_sample():
    system = PriorSystem(make_net(), GaussianDiffusion(prediction_type="sample"), cond_drop_prob=1.0)
    assert system.drop_mask(64, 1.0).all() and not system.drop_mask(64, 0.0).any()


def test_guidance_scale_one_is_the_conditional_prediction():
    net = nonzero_(make_net()).eval()
    x, t, cond = torch.randn(3, D), torch.randint(0, 1000, (3,)), conditioning(3)
    assert torch.allclose(guided_denoiser(net, cond, PRIOR_DROP, 1.0)(x, t), net(x, t, **cond), atol=1e-6)
    guided = guided_denoiser(net, cond, PRIOR_DROP, 3.0)(x, t)
    c, u = net(x, t, **cond), net(x, t, **cond, cond_drop_mask=torch.ones(3, dtype=torch.bool))
    assert torch.allclose(guided, u + 3.0 * (c - u), atol=1e-5)


@pytest.mark.parametrize("dropped", [None, "some", "all"])
def test_conditioned_prior_equals_forward(dropped):
    """The cached prefix (caption tokens, text embedding) gives what the full forward gives, at every step."""
    net = nonzero_(make_net()).eval()
    cond = conditioning(4)
    cond["text_mask"][1, 2:] = False  # captions of different lengths
    if dropped:
        cond["cond_drop_mask"] = torch.tensor([True, False, True, False]) if dropped == "some" \
            else torch.ones(4, dtype=torch.bool)
    denoise = net.conditioned(**cond)
    for seed in range(3):  # the same conditioning, new x_t and t each step
        g = torch.Generator().manual_seed(seed)
        x, t = torch.randn(4, D, generator=g), torch.randint(0, 1000, (4,), generator=g)
        assert torch.allclose(denoise(x, t), net(x, t, **cond), atol=1e-5)
    with pytest.raises(ValueError, match="as the conditioning"):
        denoise(torch.randn(3, D), torch.zeros(3, dtype=torch.long))


def test_conditioned_prior_under_bf16_autocast():
    """The cached path keeps forward's dtypes under autocast (bf16 projections, fp32 residual stream)."""
    net = nonzero_(make_net()).eval()
    cond, x, t = conditioning(4), torch.randn(4, D), torch.randint(0, 1000, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached, full = net.conditioned(**cond)(x, t), net(x, t, **cond)
    assert cached.dtype == full.dtype
    assert torch.allclose(cached.float(), full.float(), atol=3e-2, rtol=3e-2)


def test_guided_denoiser_uses_the_cache_in_eval_only(monkeypatch):
    net = nonzero_(make_net())
    x, t, cond = torch.randn(3, D), torch.randint(0, 1000, (3,)), conditioning(3)
    calls = []
    original = PriorTransformer.conditioned
    monkeypatch.setattr(PriorTransformer, "conditioned", lambda self, **c: calls.append(1) or original(self, **c))
    net.eval()
    denoise = guided_denoiser(net, cond, PRIOR_DROP, 3.0)
    first = denoise(x, t)
    assert torch.allclose(denoise(x, t), first) and len(calls) == 1  # prepared once per sampling call
    c, u = net(x, t, **cond), net(x, t, **cond, cond_drop_mask=torch.ones(3, dtype=torch.bool))
    assert torch.allclose(first, u + 3.0 * (c - u), atol=1e-5)
    net.train()  # dropout draws per step: the cache would freeze the prefix's draw
    guided_denoiser(net, cond, PRIOR_DROP, 3.0)(x, t)
    assert len(calls) == 1


def test_tiny_prior_overfits_eight_pairs():
    torch.manual_seed(0)
    net, diffusion, norm = make_net(), GaussianDiffusion(prediction_type="sample"), EmbedNormalizer(D)
    cond = conditioning(8)
    target = F.normalize(torch.randn(8, D), dim=-1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(300):
        loss = diffusion.training_losses(net, norm.encode(target), **cond)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    sampled = sample_image_embeds(net.eval(), diffusion, norm, cond["text_embed"], cond["text_tokens"],
                                  cond["text_mask"], SamplerConfig(num_steps=32), 2, seeds=list(range(8)))
    assert (sampled * target).sum(-1).min() > 0.95


def test_prior_sampling_is_deterministic_per_seed():
    net, diffusion, norm = nonzero_(make_net()).eval(), GaussianDiffusion(prediction_type="sample"), EmbedNormalizer(D)
    cond = conditioning(3)
    run = lambda seeds, cfg: sample_image_embeds(net, diffusion, norm, cond["text_embed"], cond["text_tokens"],  # noqa: E731
                                                 cond["text_mask"], cfg, 2, seeds=seeds)
    for cfg in (SamplerConfig(num_steps=8), SamplerConfig(name="ddpm", num_steps=8, cond_scale=2.0)):
        a, b = run([1, 2, 3], cfg), run([1, 2, 3], cfg)
        assert torch.equal(a, b)
        assert not torch.allclose(a, run([4, 5, 6], cfg))
        assert torch.allclose(a.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_reranking_keeps_the_candidate_closest_to_the_text(monkeypatch):
    import unclip.generate as generate

    net, diffusion, norm = make_net().eval(), GaussianDiffusion(prediction_type="sample"), EmbedNormalizer(D)
    cond = conditioning(2)
    candidates = F.normalize(torch.randn(2 * 4, D), dim=-1)
    candidates[1] = cond["text_embed"][0]  # caption 0, candidate 1: identical to its text embedding
    candidates[4 + 3] = cond["text_embed"][1]  # caption 1, candidate 3
    monkeypatch.setattr(generate, "sample_loop", lambda *a, **k: norm.encode(candidates))
    best = sample_image_embeds(net, diffusion, norm, cond["text_embed"], cond["text_tokens"], cond["text_mask"],
                               SamplerConfig(num_steps=2), 4, seeds=[0, 1])
    assert torch.allclose(best, cond["text_embed"], atol=1e-6)


def test_embedding_metrics():
    image = F.normalize(torch.randn(20, D), dim=-1)
    text = F.normalize(image + 2 * torch.randn(20, D), dim=-1)
    captions = [f"caption {i}" for i in range(20)]
    perfect = embedding_metrics(image, image, text, captions)
    assert perfect["prior_cosine"] == pytest.approx(1.0) and perfect["prior_retrieval_top1"] == 1.0
    assert perfect["text_cosine"] < 0.9 and perfect["unrelated_cosine"] < 0.5
    random = embedding_metrics(F.normalize(torch.randn(20, D), dim=-1), image, text, captions)
    assert random["prior_cosine"] < 0.5 and random["prior_retrieval_top1"] < 0.5
    assert perfect["text_retrieval_top1"] == random["text_retrieval_top1"] < 1.0  # the baseline: text alone
    assert embedding_metrics(image, image, image, captions)["text_retrieval_top1"] == 1.0


class WeightSpy(pl.Callback):
    """Records the net's weights as the validation steps see them."""

    def __init__(self) -> None:
        self.seen = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen.append({k: v.clone() for k, v in pl_module.net.state_dict().items()})


def test_ema_weights_are_used_at_validation_and_saved_for_inference(tmp_path, compose_cfg):
    from hydra.utils import instantiate

    from unclip.callbacks import EMA
    from unclip.checkpoint import load_stage_checkpoint, net_state_dict

    cfg = compose_cfg("train", ["experiment=tiny_prior", "trainer.max_steps=8", "trainer.val_check_interval=8"],
                      tmp_path)
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    spy, ema = WeightSpy(), EMA(decay=0.9)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", filename="step{step}", every_n_train_steps=8,
                                         auto_insert_metric_name=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=8, val_check_interval=8, check_val_every_n_epoch=None,
                         limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                         callbacks=[spy, ema, saver], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    averaged = {k[len("module.net."):]: v for k, v in ema._average_model.state_dict().items()
                if k.startswith("module.net.")}
    assert spy.seen and all(torch.equal(spy.seen[-1][k], averaged[k]) for k in averaged)
    path = tmp_path / "ckpts" / "step8.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    saved = net_state_dict(load_stage_checkpoint(path, "prior")["state_dict"])
    training = net_state_dict(ckpt["current_model_state"])
    assert all(torch.equal(saved[k], averaged[k]) for k in averaged)
    assert any(not torch.equal(saved[k], training[k]) for k in saved)
