"""Samplers: the reverse process through diffusers' schedulers, classifier-free guidance, DDIM inversion.

Schedulers are diffusers' (`set_timesteps`, then `step`), picked by a short name or any diffusers scheduler
class path, so users can swap them by config:

    "ddpm"    ancestral sampling (Ho et al. 2020, Algorithm 2)
    "ddim"    DDIM (Song et al. 2021); eta=0 deterministic, eta>0 adds fresh noise (variations, sec. 3.1)
    "dpmpp"   DPM-Solver++(2M) (Lu et al. 2022), good images in 15-25 steps
    "unipc"   UniPC (Zhao et al. 2023)
    "diffusers.EulerAncestralDiscreteScheduler" or any other scheduler class in diffusers

The denoising loop keeps the device queue full: timesteps for the net are moved to the device once, the
scheduler's own bookkeeping stays on the host (scalars), and noise comes from generators on the sampling
device, so no step waits for the GPU. Thresholding of x_0: "none", "static" (clip to [-1, 1]) or "dynamic"
(Saharia et al. 2022, sec. 2.3: a per-sample percentile of |x_0|, at least 1, bounds x_0).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

Thresholding = Literal["none", "static", "dynamic"]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, ...), t (B,)) -> net output

SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}

__all__ = ["SCHEDULERS", "make_scheduler", "guided_denoiser", "conditioned", "sample_loop", "ddim_invert",
           "make_generators", "has_variance", "mean_output"]


def _scheduler_class(name: str):
    import diffusers

    if name in SCHEDULERS:
        return getattr(diffusers, SCHEDULERS[name])
    module_name, _, class_name = name.rpartition(".")
    if module_name.split(".")[0] != "diffusers":
        raise ValueError(f"unknown sampler {name!r}: use one of {sorted(SCHEDULERS)} or 'diffusers.<SchedulerClass>'")
    return getattr(importlib.import_module(module_name), class_name)


def make_scheduler(
    name: str,
    *,
    num_train_timesteps: int,
    beta_schedule: str,
    prediction_type: str,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    thresholding: Thresholding = "none",
    dynamic_thresholding_ratio: float = 0.995,
    threshold_max: float = 3.0,
    timestep_spacing: str = "trailing",
    **extra: Any,
):
    """A diffusers scheduler over the training schedule, with x_0 thresholding translated to its options.

    Static clipping is dynamic thresholding with the bound fixed at 1, which every thresholding-capable
    scheduler supports, so "static" works for all of them.
    """
    cls = _scheduler_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    options: dict[str, Any] = dict(
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type=prediction_type,
        beta_start=beta_start, beta_end=beta_end, timestep_spacing=timestep_spacing,
        clip_sample=False, set_alpha_to_one=True, algorithm_type="dpmsolver++",
    )
    if thresholding != "none":
        if "thresholding" not in accepted:
            raise ValueError(f"sampler {name!r} does not support x0 thresholding ({thresholding!r})")
        options.update(thresholding=True, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                       sample_max_value=1.0 if thresholding == "static" else threshold_max)
    options.update(extra)
    unknown = set(extra) - accepted
    if unknown:
        raise ValueError(f"sampler {name!r} ({cls.__name__}) has no option(s) {sorted(unknown)}")
    return cls(**{k: v for k, v in options.items() if k in accepted})


def guided_denoiser(
    net: Callable[..., torch.Tensor],
    cond: dict[str, Any],
    drop_mask_names: Sequence[str],
    cond_scale: float | Sequence[float] = 1.0,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Classifier-free guidance (Ho & Salimans 2022): out = uncond + s * (cond - uncond).

    Both branches see the same x_t and run as ONE batched forward: inputs are stacked [cond; uncond] along the
    batch and every drop mask in `drop_mask_names` is False for the first half and True for the second. With
    cond_scale == 1 only the conditional branch runs. Returns a function (x_t (B, ...), t (B,)) -> (B, ...).

    cond_scale may also be one scale per drop mask, s_1..s_K: nested guidance, each condition guided given the
    ones before it (Brooks et al. 2023, "InstructPix2Pix", eq. 3): with c_k the net given conditions 1..k (c_0
    nothing), out = c_0 + sum_k s_k (c_k - c_{k-1}), K + 1 branches in one forward. Equal scales are the
    single-scale rule (the sum telescopes) and run as it does. For the decoder (image, caption): how strongly
    the caption is followed beyond what the image embedding already says.
    """
    scales = [float(s) for s in cond_scale] if isinstance(cond_scale, (list, tuple)) else [float(cond_scale)]
    if len(scales) > 1 and len(scales) != len(drop_mask_names):
        raise ValueError(f"{len(scales)} guidance scales for the drop masks {list(drop_mask_names)}: give one "
                         "scale, or one per drop mask")
    if len(set(scales)) == 1:
        scales = scales[:1]
    if scales == [1.0]:
        return conditioned(net, cond)
    n_branches = len(scales) + 1  # [c_K; ...; c_0]; with one scale [cond; uncond]

    def repeated(v: Any) -> Any:
        return torch.cat([v] * n_branches) if isinstance(v, torch.Tensor) else v

    cond_n = {k: repeated(v) for k, v in cond.items() if k not in drop_mask_names}
    stacked: dict[tuple[int, torch.device], Denoiser] = {}

    def branches(b: int, device: torch.device) -> Denoiser:
        """The net on [c_K; ...; c_0] conditioning for batch b, built once per (b, device): branch j of the
        stack drops the last j masks (all of them with one scale, in the uncond half)."""
        if (b, device) not in stacked:
            keep = torch.zeros(b, dtype=torch.bool, device=device)
            masks = {}
            for i, name in enumerate(drop_mask_names):
                given = cond.get(name)
                first = keep if given is None else given.to(device=device, dtype=torch.bool)
                kept_until = n_branches - 1 - i if len(scales) > 1 else 1  # branches 0..kept_until-1 keep it
                masks[name] = torch.cat([first if j < kept_until else ~keep for j in range(n_branches)])
            stacked[(b, device)] = conditioned(net, {**cond_n, **masks})
        return stacked[(b, device)]

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = branches(x.shape[0], x.device)(torch.cat([x] * n_branches), torch.cat([t] * n_branches))
        outs = out.float().chunk(n_branches)[::-1]  # c_0 .. c_K; the extrapolation in fp32, whatever the autocast
        variance = None
        if has_variance(outs[-1], x):  # learned variance: guide the mean, keep the conditional branch's variance
            variance = outs[-1].chunk(2, dim=1)[1]
            outs = [o.chunk(2, dim=1)[0] for o in outs]
        guided = outs[0]
        for k, s in enumerate(scales, start=1):
            guided = guided + s * (outs[k] - outs[k - 1])
        return guided if variance is None else torch.cat([guided, variance], dim=1)

    return denoise


def conditioned(net: Callable[..., torch.Tensor], cond: dict[str, Any]) -> Denoiser:
    """(x_t, t) -> net(x_t, t, **cond) for conditioning fixed over a sampling call. A net in eval mode with a
    `conditioned(**cond)` method (PriorTransformer) does the work that depends on the conditioning alone once,
    there, instead of at every step."""
    prepare = getattr(net, "conditioned", None)
    if callable(prepare) and not getattr(net, "training", False):
        return prepare(**cond)
    return lambda x, t: net(x, t, **cond)


def has_variance(out: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a net output for images x (B, C, H, W) carries a learned variance: (B, 2C, H, W)."""
    return out.ndim > 2 and out.shape[1] == 2 * x.shape[1]


def mean_output(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The mean prediction of a net output (B, C or 2C, ...) for x (B, C, ...): a learned variance's C channels
    are dropped (for every scheduler but ancestral DDPM with variance_type="learned_range")."""
    return out[:, : x.shape[1]] if has_variance(out, x) else out


def make_generators(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per sample on the sampling device: the same seed gives the same sample on that device."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _randn(shape: Sequence[int], generator, device, dtype=torch.float32) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=dtype)


def sample_loop(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: Sequence[int],
    scheduler,
    num_steps: int,
    *,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str = "cpu",
    x_T: torch.Tensor | None = None,
    eta: float = 0.0,
    progress: bool = False,
    desc: str = "sampling",
) -> torch.Tensor:
    """Run the reverse process from x_T ~ N(0, I) (or the given x_T) for `num_steps` scheduler steps.

    `denoise(x_t, t)` returns the net's (guided) output for x_t (B, ...) at integer timesteps t (B,).
    """
    scheduler.set_timesteps(num_steps)  # host-side timesteps: the scheduler's indexing never syncs the device
    timesteps = scheduler.timesteps
    net_timesteps = timesteps.to(device)
    x = _randn(shape, generator, device) if x_T is None else x_T.to(device, torch.float32)
    x = x * scheduler.init_noise_sigma
    step_params = inspect.signature(scheduler.step).parameters
    step_kwargs: dict[str, Any] = {}
    if "eta" in step_params:
        step_kwargs["eta"] = eta
    if "generator" in step_params:
        step_kwargs["generator"] = generator
    if "use_clipped_model_output" in step_params:  # DDIM: the noise estimate must agree with the thresholded x_0
        step_kwargs["use_clipped_model_output"] = True
    iterator = range(len(timesteps))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=desc, leave=False)
    batch = shape[0]
    learned_variance = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
    for i in iterator:
        t = timesteps[i]
        model_input = scheduler.scale_model_input(x, t)
        out = denoise(model_input, net_timesteps[i].expand(batch))
        if not learned_variance:
            out = mean_output(out, x)
        x = scheduler.step(out.float(), t, x, **step_kwargs).prev_sample
    return x


def ddim_invert(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    diffusion_config: dict[str, Any],
    num_steps: int,
    progress: bool = False,
) -> torch.Tensor:
    """Deterministic DDIM inversion x_0 -> x_T (Song et al. 2021, sec. 4.3; unCLIP text diffs, sec. 3.3).

    Runs the DDIM ODE forward in time over the same timesteps that `ddim` sampling with `num_steps` visits,
    so decoding the result with the same net and conditioning reconstructs x_0 up to discretisation error.
    """
    from diffusers import DDIMInverseScheduler

    inverse = DDIMInverseScheduler(
        num_train_timesteps=diffusion_config["num_train_timesteps"],
        beta_schedule=diffusion_config["beta_schedule"],
        prediction_type=diffusion_config["prediction_type"],
        beta_start=diffusion_config.get("beta_start", 0.0001),
        beta_end=diffusion_config.get("beta_end", 0.02),
        clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=True,
    )
    inverse.set_timesteps(num_steps)
    timesteps = inverse.timesteps
    net_timesteps = timesteps.to(x0.device)
    x = x0.float()
    iterator = range(len(timesteps))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="inverting", leave=False)
    for i in iterator:
        out = mean_output(denoise(x, net_timesteps[i].expand(x.shape[0])), x)
        x = inverse.step(out.float(), timesteps[i], x).prev_sample
    return x
