"""Gaussian diffusion: the forward process q(x_t | x_0) and the training losses.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021; Salimans & Ho 2022 for v):

    code               paper
    alphas_cumprod     alpha_bar_t = prod_{s<=t} (1 - beta_s)
    q_sample           x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps                 (Ho eq. 4)
    "epsilon"          the net predicts eps
    "sample"           the net predicts x_0 (the unCLIP prior's choice, Ramesh et al. 2022 sec. 2.2)
    "v_prediction"     the net predicts v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0
    sigma_data > 0     ("sample" only) the net's output F is preconditioned as in Karras et al. 2022 (EDM,
                       eq. 7 and Table 1), written for x_t: x_0 = c_skip x_t / sqrt(alpha_bar_t) + c_out F with
                       sigma^2 = 1 / snr, c_skip = sigma_d^2 / (sigma^2 + sigma_d^2), c_out = sigma sigma_d /
                       sqrt(sigma^2 + sigma_d^2); the loss is the MSE on F (EDM's lambda = 1 / c_out^2 on x_0).
                       Below sigma_d the noisy input passes through (c_skip -> 1), so a small net need not learn
                       to copy fine detail; above it the net predicts x_0 as with plain "sample". sigma_d = 1 is
                       v-prediction (F = -v)
    snr(t)             alpha_bar_t / (1 - alpha_bar_t)
    min_snr weighting  per-timestep loss weight min(snr, gamma) / snr, expressed for the predicted quantity
                       (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy");
                       with a floor f > 0, clamp(snr, f, gamma) / snr: below snr = f (high noise) the weight of
                       x_0-MSE times f instead of min-SNR's vanishing one
    learn_sigma        the net also outputs v in [-1, 1] per pixel: log Sigma_t = (v+1)/2 log beta_t
                       + (1-v)/2 log beta~_t (Nichol & Dhariwal 2021, eq. 15), trained by L_hybrid = L_simple
                       + lambda L_vlb (eq. 16) with the mean's gradient stopped in L_vlb; beta~_t = beta_t
                       (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) is the true posterior's variance (Ho eq. 7)

The betas come from diffusers' scheduler of the same name, so the schedule a net is trained on is exactly the
one its sampler (a diffusers scheduler built by `make_scheduler`) integrates. The cumulative products are
computed in float64 and stored in float32: in float32, 1 - alpha_bar_t loses its digits near t = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

PredictionType = Literal["epsilon", "sample", "v_prediction"]
BetaSchedule = Literal["squaredcos_cap_v2", "linear", "scaled_linear", "sigmoid"]

__all__ = ["GaussianDiffusion", "discretized_gaussian_log_likelihood", "extract"]


def extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] (B,) reshaped to (B, 1, ..., 1) to broadcast against a tensor of `ndim` dims."""
    return values.gather(0, t.long()).view(-1, *([1] * (ndim - 1)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor,
                                        bins: int = 256) -> torch.Tensor:
    """log P(x) per element for x on `bins` levels in [-1, 1] under N(mean, exp(log_var)) integrated over each
    level's bin, the outermost bins reaching to -inf and +inf (Ho et al. 2020, eq. 13)."""
    half = 1.0 / (bins - 1)
    inv_std = torch.exp(-0.5 * log_var)
    upper = torch.special.ndtr(inv_std * (x - mean + half))  # P(X < x + half)
    lower = torch.special.ndtr(inv_std * (x - mean - half))  # P(X < x - half)
    above = torch.special.ndtr(inv_std * (mean - x + half))  # P(X > x - half), without 1 - lower's cancellation
    tiny = 1e-12
    return torch.where(x < -1.0 + half, torch.log(upper.clamp(min=tiny)),
                       torch.where(x > 1.0 - half, torch.log(above.clamp(min=tiny)),
                                   torch.log((upper - lower).clamp(min=tiny))))


class GaussianDiffusion(nn.Module):
    """Forward process and training loss for one stage. Buffers only (no weights); nets are arguments.

    Args:
        num_timesteps: training timesteps T (1000 in the paper).
        beta_schedule: "squaredcos_cap_v2" (cosine, Nichol & Dhariwal 2021) or "linear" (Ho et al. 2020).
        prediction_type: what the net predicts: "epsilon", "sample" (x_0) or "v_prediction".
        loss_weighting: "none" (plain MSE on the prediction) or "min_snr".
        min_snr_gamma: gamma of min-SNR weighting (5 in the paper).
        min_snr_floor: lower clamp of the SNR in min-SNR weighting (0 = the paper's). Min-SNR gives the
            high-noise steps, where the layout is decided, almost no weight; plain x_0-MSE gives the low-noise
            steps, where outlines are sharpened, almost none (its weight in eps terms is 1 / snr). A floor of 1
            keeps x_0-MSE's weight where snr < 1 and min-SNR's above it, at most gamma times more.
        beta_start, beta_end: endpoints of the linear schedules.
        learn_sigma: the net outputs 2C channels, the second C the interpolation v of its variance (above).
        vlb_weight: lambda * T of L_hybrid, the weight of the per-sample VLB term (ADM: 0.001 * 1000).
        vlb_clamp: per-sample bound on the VLB term in bits/dim, so one sample whose predicted mean is far off
            at a small t (a huge (mu - mu~)^2 / Sigma) cannot blow up the step; bounded samples pass no gradient.
        edge_loss_weight: lambda of `edge_mse`, added to each sample's loss on images (0 = off).
        timestep_shift: training timesteps are drawn as t / T = s u / (1 + (s - 1) u) with u ~ U(0, 1) (the
            timestep shift of Esser et al. 2024, eq. 23); s > 1 spends more training on high noise, where the
            layout of an image is decided (s = 3: a quarter of the steps above t = 0.9 T instead of a tenth).
            1 = uniform. Sampling is unaffected.
        sigma_data: with prediction_type "sample", > 0 preconditions the net's output (above, EDM): sigma_d,
            the noise level below which x_t is passed through rather than re-predicted. 0 = plain x_0.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: BetaSchedule = "squaredcos_cap_v2",
        prediction_type: PredictionType = "epsilon",
        loss_weighting: Literal["none", "min_snr"] = "none",
        min_snr_gamma: float = 5.0,
        min_snr_floor: float = 0.0,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        learn_sigma: bool = False,
        vlb_weight: float = 1.0,
        vlb_clamp: float = 10.0,
        timestep_shift: float = 1.0,
        sigma_data: float = 0.0,
        edge_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be > 0, got {timestep_shift}")
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon, sample or v_prediction, got {prediction_type!r}")
        if loss_weighting not in ("none", "min_snr"):
            raise ValueError(f"loss_weighting must be 'none' or 'min_snr', got {loss_weighting!r}")
        if not 0.0 <= min_snr_floor <= min_snr_gamma:
            raise ValueError(f"min_snr_floor must be in [0, min_snr_gamma={min_snr_gamma}], got {min_snr_floor}")
        if min_snr_floor > 0 and prediction_type == "epsilon":
            raise ValueError("min_snr_floor is for sample or v_prediction: with epsilon its weight floor / snr "
                             "is unbounded at high noise")
        if sigma_data < 0 or (sigma_data > 0 and prediction_type != "sample"):
            raise ValueError(f"sigma_data preconditions x_0 prediction: it needs prediction_type='sample' and must "
                             f"be >= 0, got {sigma_data} with {prediction_type!r}")
        if sigma_data > 0 and (loss_weighting != "none" or learn_sigma):
            raise ValueError("sigma_data > 0 has its own loss weighting (the MSE on the preconditioned output): "
                             "set loss_weighting='none' and learn_sigma=false")
        self.num_timesteps = num_timesteps
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        self.loss_weighting = loss_weighting
        self.min_snr_gamma, self.min_snr_floor = min_snr_gamma, float(min_snr_floor)
        self.beta_start, self.beta_end = beta_start, beta_end
        self.learn_sigma, self.vlb_weight, self.vlb_clamp = learn_sigma, vlb_weight, vlb_clamp
        self.timestep_shift = float(timestep_shift)
        self.sigma_data = float(sigma_data)
        if edge_loss_weight < 0:
            raise ValueError(f"edge_loss_weight must be >= 0, got {edge_loss_weight}")
        self.edge_loss_weight = float(edge_loss_weight)

        betas = self.make_scheduler("ddpm").betas.to(torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_var = betas * (1 - prev) / (1 - alphas_cumprod)  # beta~_t; 0 at t = 0
        posterior_var = torch.cat([posterior_var[1:2], posterior_var[1:]])  # log-safe: beta~_1 at t = 0 (ADM)
        for name, value in {
            "log_betas": betas.log(),
            "posterior_log_var": posterior_var.log(),
            "posterior_coef_x0": betas * prev.sqrt() / (1 - alphas_cumprod),  # Ho eq. 7
            "posterior_coef_xt": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        }.items():
            self.register_buffer(name, value.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt().float(), persistent=False)
        snr = alphas_cumprod / (1 - alphas_cumprod)
        self.register_buffer("snr", snr.float(), persistent=False)
        d2 = self.sigma_data**2
        # EDM preconditioning in x_t terms: x_0 = skip_xt * x_t + skip_out * F (both 0 / 1 when sigma_data = 0)
        skip_out = self.sigma_data / (1 + d2 * snr).sqrt() if d2 else torch.ones_like(snr)
        self.register_buffer("skip_xt", (d2 * snr / (1 + d2 * snr) / alphas_cumprod.sqrt()).float(), persistent=False)
        self.register_buffer("skip_out", skip_out.float(), persistent=False)

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
            "min_snr_floor": self.min_snr_floor,
            "learn_sigma": self.learn_sigma,
            "vlb_weight": self.vlb_weight,
            "vlb_clamp": self.vlb_clamp,
            "timestep_shift": self.timestep_shift,
            "sigma_data": self.sigma_data,
            "edge_loss_weight": self.edge_loss_weight,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GaussianDiffusion:
        """The inverse of `config` (checkpoints written before a key existed get its default)."""
        args = dict(config)
        args["num_timesteps"] = args.pop("num_train_timesteps")
        return cls(**args)

    def make_scheduler(self, name: str = "ddim", **kwargs: Any):
        """A diffusers scheduler integrating this schedule; see `unclip.diffusion.sampling.make_scheduler`."""
        from unclip.diffusion.sampling import make_scheduler

        if self.learn_sigma and name == "ddpm":  # ancestral steps use the learned variance; the others drop it
            kwargs.setdefault("variance_type", "learned_range")
        return make_scheduler(name, num_train_timesteps=self.num_timesteps, beta_schedule=self.beta_schedule,
                              prediction_type=self.prediction_type, beta_start=self.beta_start,
                              beta_end=self.beta_end, **kwargs)

    # ------------------------------------------------------------------ forward process
    def sample_timesteps(self, batch_size: int, device: torch.device, generator=None) -> torch.Tensor:
        """Training timesteps (B,) int64 in [0, T): uniform, or shifted toward high noise (`timestep_shift`)."""
        if self.timestep_shift == 1.0:
            return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)
        u = torch.rand(batch_size, device=device, generator=generator)
        shifted = self.timestep_shift * u / (1 + (self.timestep_shift - 1) * u)
        return (shifted * self.num_timesteps).long().clamp(max=self.num_timesteps - 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.  Shapes: x0 (B, ...), t (B,)."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of the configured prediction type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            if self.sigma_data:
                return (x0 - extract(self.skip_xt, t, x0.ndim) * self.q_sample(x0, t, noise)) / extract(
                    self.skip_out, t, x0.ndim)
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
            return self.skip_to_x0(x_t, t, model_output)
        return a * x_t - s * model_output

    def skip_to_x0(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x_0 from a "sample" net's output (B, ...): the output itself, or with sigma_data its preconditioned
        reading c_skip x_t / sqrt(alpha_bar_t) + c_out F."""
        if not self.sigma_data:
            return out
        return extract(self.skip_xt, t, x_t.ndim) * x_t + extract(self.skip_out, t, x_t.ndim) * out

    def as_prediction(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                      ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A sampler's denoiser (x_t, t) -> net output, read as the prediction its scheduler expects
        (`prediction_type`): the identity unless sigma_data preconditions the output. Guidance is linear in the
        output and the skip term is the same for both branches, so guiding F or x_0 is the same."""
        if not self.sigma_data:
            return denoise
        return lambda x_t, t: self.skip_to_x0(x_t, t, denoise(x_t, t))

    def edge_mse(self, x0_pred: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE (B,) between the finite differences (horizontal and vertical) of an image's x_0
        prediction and of x_0, in the units of the prediction's own loss. A quadratic form with a fixed operator,
        so the minimiser of the total loss is still the posterior mean E[x_0 | x_t]; added with weight lambda,
        an error at angular frequency w along an axis weighs 1 + 4 lambda sin^2(w / 2) instead of 1: outlines
        gain weight against the flat colour inside them."""
        err = x0_pred - x0
        dx, dy = err.diff(dim=-1), err.diff(dim=-2)
        per = dx.pow(2).flatten(1).mean(1) + dy.pow(2).flatten(1).mean(1)
        return per / self.x0_error_scale(t)

    def x0_error_scale(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) factor from the loss on the net's output to the x_0 error it implies: |dx_0|^2 / |d out|^2."""
        if self.prediction_type == "epsilon":
            return 1.0 / self.snr.gather(0, t.long())
        if self.prediction_type == "v_prediction":
            return 1.0 / (self.snr.gather(0, t.long()) + 1.0)
        return self.skip_out.gather(0, t.long()) ** 2  # "sample": c_out^2 with sigma_data, else 1

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight (B,) of the MSE on the prediction; min-SNR-gamma (with its floor) converted to each
        target."""
        if self.loss_weighting == "none":
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.snr.gather(0, t.long())
        clipped = snr.clamp(min=self.min_snr_floor, max=self.min_snr_gamma)
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
        if self.learn_sigma:
            if model_output.shape[1] != 2 * x0.shape[1]:
                raise ValueError(f"learn_sigma needs a net with 2 x {x0.shape[1]} output channels (mean and "
                                 f"variance), got {model_output.shape[1]}: set the net's out_channels")
            model_output, variance = model_output.chunk(2, dim=1)
        mse = F.mse_loss(model_output.float(), self.target(x0, noise, t).float(), reduction="none")
        per_sample = mse.flatten(1).mean(dim=1)
        if self.edge_loss_weight:
            if x0.ndim != 4:
                raise ValueError(f"edge_loss_weight is for images (B, C, H, W); got x_0 of shape {tuple(x0.shape)}")
            per_sample = per_sample + self.edge_loss_weight * self.edge_mse(
                self.predict_x0(x_t, t, model_output.float()), x0.float(), t)
        per_sample = per_sample * self.loss_weight(t)
        out = {"t": t, "x_t": x_t, "model_output": model_output}
        if self.learn_sigma:
            x0_pred = self.predict_x0(x_t, t, model_output.detach().float())  # L_vlb trains the variance only
            vlb = self.vlb_term(x0.float(), x_t.float(), t, x0_pred, variance.float())
            out["vlb"] = vlb
            per_sample = per_sample + self.vlb_weight * vlb.clamp(max=self.vlb_clamp)
        out["loss"] = per_sample
        return out

    # ------------------------------------------------------------------ learned variance (L_vlb)
    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0) (Ho eq. 7)."""
        return (extract(self.posterior_coef_x0, t, x_t.ndim) * x0
                + extract(self.posterior_coef_xt, t, x_t.ndim) * x_t)

    def model_log_variance(self, variance: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log Sigma_t from the net's variance output v (B, C, ...), clamped to [-1, 1] (Nichol eq. 15)."""
        frac = (variance.clamp(-1.0, 1.0) + 1.0) / 2.0
        return (frac * extract(self.log_betas, t, variance.ndim)
                + (1.0 - frac) * extract(self.posterior_log_var, t, variance.ndim))

    def vlb_term(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, x0_pred: torch.Tensor,
                 variance: torch.Tensor) -> torch.Tensor:
        """L_t in bits/dim per sample (B,): KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the
        decoder's discretised NLL -log p(x_0 | x_1) for t = 0 (Ho sec. 3.3, 8-bit data in [-1, 1])."""
        mean_q, log_var_q = self.posterior_mean(x0, x_t, t), extract(self.posterior_log_var, t, x_t.ndim)
        mean_p, log_var_p = self.posterior_mean(x0_pred, x_t, t), self.model_log_variance(variance, t)
        kl = 0.5 * (-1.0 + log_var_p - log_var_q + torch.exp(log_var_q - log_var_p)
                    + (mean_q - mean_p) ** 2 * torch.exp(-log_var_p))
        nll = -discretized_gaussian_log_likelihood(x0, mean_p, log_var_p)
        per_dim = torch.where((t == 0).view(-1, *([1] * (x0.ndim - 1))), nll, kl)
        return per_dim.flatten(1).mean(dim=1) / math.log(2.0)
