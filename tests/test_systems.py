"""Shared system machinery: non-finite steps are skipped on the device, parameter groups, LR schedule."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch

from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.nets import PriorTransformer
from unclip.systems.base import warmup_cosine
from unclip.systems.prior import PriorSystem


class PoisonedPrior(PriorSystem):
    """Returns a NaN loss at step 1 and records the weights around it."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 1:
            self.before = {k: v.clone() for k, v in self.net.state_dict().items()}
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan")
        if self.global_step == 2:
            self.after = {k: v.clone() for k, v in self.net.state_dict().items()}
        return super().training_step(batch, batch_idx)


def batches(n: int = 4):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        yield {"caption": ["x"] * 4, "image_embed": torch.randn(4, 16, generator=g),
               "text_embed": torch.randn(4, 16, generator=g), "text_tokens": torch.randn(4, 8, 16, generator=g),
               "text_mask": torch.ones(4, 8, dtype=torch.bool)}


@pytest.mark.parametrize("fused", [True, False])
def test_a_nonfinite_step_is_skipped_and_counted(fused):
    net = PriorTransformer(embed_dim=16, text_token_dim=16, num_text_tokens=8, width=32, depth=1, heads=2)
    system = PoisonedPrior(net, GaussianDiffusion(prediction_type="sample"), warmup_steps=0,
                           optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, fused=fused))
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, gradient_clip_val=1.0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(system, train_dataloaders=torch.utils.data.DataLoader(list(batches()), batch_size=None))
    assert all(torch.equal(system.before[k], system.after[k]) for k in system.before)  # the NaN step changed nothing
    assert float(system.nonfinite_steps) == 1.0
    assert all(torch.isfinite(p).all() for p in system.parameters())
    state = next(iter(trainer.optimizers[0].state.values()))
    if fused:
        assert int(state["step"]) == 2  # the fused kernel did not count the skipped step
    assert torch.isfinite(state["exp_avg"]).all()


def test_parameter_groups_exempt_norms_biases_and_embeddings():
    net = PriorTransformer(embed_dim=16, text_token_dim=16, num_text_tokens=8, width=32, depth=1, heads=2)
    system = PriorSystem(net, GaussianDiffusion(prediction_type="sample"))
    decay, no_decay = system.parameter_groups(0.05)
    names = {id(p): n for n, p in system.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    exempt = [names[id(p)] for p in no_decay["params"]]
    assert any("null_text_embed" in n for n in exempt) and any("bias" in n for n in exempt)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(system.parameters()))


def test_warmup_then_cosine():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110, decay="cosine", min_lr_ratio=0.1)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b - 1e-9 for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warm-up


def test_every_rank_and_every_resume_gets_its_own_random_stream():
    from unclip.systems.base import stream_seed

    seeds = {stream_seed(0, rank, step) for rank in range(8) for step in (0, 1000, 2000)}
    assert len(seeds) == 24
    assert stream_seed(1, 0, 0) != stream_seed(0, 0, 0)
