"""Gaussian diffusion: the forward process q(x_t | x_0) and the training losses.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021; Salimans & Ho 2022 for v):

    code               paper
    alphas_cumprod     alpha_bar_t = prod_{s<=t} (1 - beta_s)
    q_sample           x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps                 (Ho eq. 4)
    "epsilon"          the net predicts eps
    "sample"           the net predicts x_0 (the unCLIP prior's choice, Ramesh et al. 2022 sec. 2.2)
    "v_prediction"     the net predicts v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0
    snr(t)             alpha_bar_t / (1 - alpha_bar_t)
    min_snr weighting  per-timestep loss weight min(snr, gamma) / snr, expressed for the predicted quantity
                       (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy")

The betas come from diffusers' scheduler of the same name, so the schedule a net is trained on is exactly the
one its sampler (a diffusers scheduler built by `make_scheduler`) integrates. The cumulative products are
computed in float64 and stored in float32: in float32, 1 - alpha_bar_t loses its digits near t = 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

PredictionType = Literal["epsilon", "sample", "v_prediction"]
BetaSchedule = Literal["squaredcos_cap_v2", "linear", "scaled_linear", "sigmoid"]

__all__ = ["GaussianDiffusion", "extract"]


def extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] (B,) reshaped to (B, 1, ..., 1) to broadcast against a tensor of `ndim` dims."""
    return values.gather(0, t.long()).view(-1, *([1] * (ndim - 1)))


class GaussianDiffusion(nn.Module):
    """Forward process and training loss for one stage. Buffers only (no weights); nets are arguments.

    Args:
        num_timesteps: training timesteps T (1000 in the paper).
        beta_schedule: "squaredcos_cap_v2" (cosine, Nichol & Dhariwal 2021) or "linear" (Ho et al. 2020).
        prediction_type: what the net predicts: "epsilon", "sample" (x_0) or "v_prediction".
        loss_weighting: "none" (plain MSE on the prediction) or "min_snr".
        min_snr_gamma: gamma of min-SNR weighting (5 in the paper).
        beta_start, beta_end: endpoints of the linear schedules.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: BetaSchedule = "squaredcos_cap_v2",
        prediction_type: PredictionType = "epsilon",
        loss_weighting: Literal["none", "min_snr"] = "none",
        min_snr_gamma: float = 5.0,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
    ) -> None:
        super().__init__()
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon, sample or v_prediction, got {prediction_type!r}")
        if loss_weighting not in ("none", "min_snr"):
            raise ValueError(f"loss_weighting must be 'none' or 'min_snr', got {loss_weighting!r}")
        self.num_timesteps = num_timesteps
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma
        self.beta_start, self.beta_end = beta_start, beta_end

        betas = self.make_scheduler("ddpm").betas.to(torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt().float(), persistent=False)
        self.register_buffer("snr", (alphas_cumprod / (1 - alphas_cumprod)).float(), persistent=False)

    @property
    def config(self) -> dict[str, Any]:
        """The schedule as a diffusers scheduler config (what `make_scheduler` and checkpoints use)."""
        return {
            "num_train_timesteps": self.num_timesteps,
            "beta_schedule": self.beta_schedule,
            "prediction_type": self.prediction_type,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "loss_weighting": self.loss_weighting,
            "min_snr_gamma": self.min_snr_gamma,
        }

    def make_scheduler(self, name: str = "ddim", **kwargs: Any):
        """A diffusers scheduler integrating this schedule; see `unclip.diffusion.sampling.make_scheduler`."""
        from unclip.diffusion.sampling import make_scheduler

        return make_scheduler(name, num_train_timesteps=self.num_timesteps, beta_schedule=self.beta_schedule,
                              prediction_type=self.prediction_type, beta_start=self.beta_start,
                              beta_end=self.beta_end, **kwargs)

    # ------------------------------------------------------------------ forward process
    def sample_timesteps(self, batch_size: int, device: torch.device, generator=None) -> torch.Tensor:
        """t ~ Uniform{0, ..., T-1}, (B,) int64."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.  Shapes: x0 (B, ...), t (B,)."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of the configured prediction type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """x_0 implied by a net output at (x_t, t)."""
        a = extract(self.sqrt_alphas_cumprod, t, x_t.ndim)
        s = extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
        if self.prediction_type == "epsilon":
            return (x_t - s * model_output) / a
        if self.prediction_type == "sample":
            return model_output
        return a * x_t - s * model_output

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight (B,) of the MSE on the prediction; min-SNR-gamma converted to each target."""
        if self.loss_weighting == "none":
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.snr.gather(0, t.long())
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "sample":
            return clipped
        return clipped / (snr + 1)

    def training_losses(
        self,
        net: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        on_inputs: Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], None] | None = None,
        **cond: Any,
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss (B,) for one draw of t and eps: weight(t) * mean((net(x_t, t, **cond) - target)^2).

        Returns {"loss": (B,), "t": (B,), "x_t", "model_output"}; reduce with .mean() for the step loss.
        `on_inputs(x_t, t, cond)`, if given, sees the net's inputs first (used to count FLOPs once).
        """
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        if on_inputs is not None:
            on_inputs(x_t, t, cond)
        model_output = net(x_t, t, **cond)
        mse = F.mse_loss(model_output.float(), self.target(x0, noise, t).float(), reduction="none")
        per_sample = mse.flatten(1).mean(dim=1) * self.loss_weight(t)
        return {"loss": per_sample, "t": t, "x_t": x_t, "model_output": model_output}
