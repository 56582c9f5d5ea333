"""OmegaConf resolvers the configs use (registered on import; entry points and tests import this module), and
`check_config`, which refuses wrongly typed or missing values before anything is built.

    ${unclip.precision:}      "bf16-mixed" on a GPU with bf16 support, else "32-true"
    ${unclip.wandb_offline:}  True unless W&B credentials exist (WANDB_API_KEY, or `wandb login`'s netrc entry)
                              or WANDB_MODE=online: W&B must never stop a job at an interactive login prompt
    ${unclip.net_channels:C,L}  a UNet's output channels for C image channels: 2C when L (learn_sigma) is true
"""

from __future__ import annotations

import inspect
import netrc
import os
import types
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["register_resolvers", "wandb_offline", "default_precision", "net_channels", "check_config"]


def default_precision() -> str:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def cpu_precision() -> str:
    """bf16-mixed on a CPU with AMX tiles (bf16 convolutions and matmuls 3-4x faster than fp32 there; the CPU
    study's decoder steps 1.2x faster end to end, docs/PERFORMANCE.md), else 32-true: without AMX, bf16 is
    emulated and slower."""
    import torch

    try:
        return "bf16-mixed" if torch.cpu._is_amx_tile_supported() else "32-true"
    except AttributeError:  # a torch without the probe
        return "32-true"


def wandb_offline() -> bool:
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    try:
        path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
        return not (os.path.isfile(path) and netrc.netrc(path).authenticators("api.wandb.ai"))
    except (netrc.NetrcParseError, OSError):
        return True


def net_channels(channels: int, learn_sigma: bool) -> int:
    return int(channels) * (2 if learn_sigma else 1)


_TYPE_WORDS = {bool: "true/false", int: "an integer", float: "a number", type(None): "null"}


def _plain_types(annotation: Any) -> set[type] | None:
    """The types an annotation admits when they are only numbers, bools and None (a tensor counts as a number,
    as in AdamW's `lr: float | Tensor`); None for any other annotation (not checked)."""
    import torch

    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    allowed = set()
    for arg in typing.get_args(annotation) if union else (annotation,):
        if arg in _TYPE_WORDS:
            allowed.add(arg)
        elif arg is torch.Tensor:
            allowed.add(float)
        else:
            return None
    return allowed


def _fits(value: Any, allowed: set[type]) -> bool:
    if value is None or isinstance(value, bool):
        return type(value) in allowed
    if isinstance(value, int):
        return bool(allowed & {int, float})
    if isinstance(value, float):
        return float in allowed or (int in allowed and value.is_integer())
    return False


def _annotations(target: str) -> dict[str, Any]:
    """Constructor (or function) parameter annotations of a `_target_`, evaluated; {} when it cannot be read."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
        func = obj.__init__ if inspect.isclass(obj) else obj
        params = inspect.signature(obj).parameters
    except Exception:  # an unknown target fails later, at instantiation, with Hydra's message
        return {}
    out = {}
    for name, param in params.items():
        annotation = param.annotation
        if isinstance(annotation, str):  # postponed annotations (from __future__ import annotations)
            try:
                annotation = eval(annotation, getattr(func, "__globals__", {}))
            except Exception:
                continue
        out[name] = annotation
    return out


def check_config(cfg: DictConfig, keys: tuple[str, ...], _path: str = "") -> None:
    """Refuse, before anything is built, a required value left unset (`???`) and a value a `_target_` cannot
    take where its annotation admits only numbers, bools or null (`trainer.max_steps=abc`,
    `model.optimizer.lr=abc`): one ValueError line naming the key, what it takes and what was given."""
    for key in keys:
        path = f"{_path}{key}"
        if OmegaConf.is_missing(cfg, key):
            raise ValueError(f"{path} is required: pass {path}=...")
        try:
            node = cfg[key]
        except Exception:  # an interpolation that cannot resolve: instantiation reports it
            continue
        if isinstance(node, ListConfig):
            for i, item in enumerate(node):
                if isinstance(item, DictConfig):
                    check_config(item, tuple(item.keys()), f"{path}[{i}].")
        if not isinstance(node, DictConfig):
            continue
        annotations = _annotations(node["_target_"]) if isinstance(node.get("_target_"), str) else {}
        for name, annotation in annotations.items():
            allowed = _plain_types(annotation)
            if name not in node or allowed is None or OmegaConf.is_missing(node, name):
                continue
            try:
                value = node[name]
            except Exception:
                continue
            if value is None and node.get("_partial_"):  # left for the caller to fill (e.g. net widths)
                continue
            if not _fits(value, allowed):
                words = " or ".join(_TYPE_WORDS[t] for t in _TYPE_WORDS if t in allowed)
                raise ValueError(f"{path}.{name}={value!r}: {node['_target_']} takes {words} for {name}, "
                                 f"not {type(value).__name__}")
        check_config(node, tuple(k for k in node.keys() if not str(k).startswith("_")), f"{path}.")


def register_resolvers() -> None:
    resolvers = {"unclip.precision": default_precision, "unclip.cpu_precision": cpu_precision,
                 "unclip.wandb_offline": wandb_offline,
                 "unclip.net_channels": net_channels}
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
