"""OmegaConf resolvers the configs use (registered on import; entry points and tests import this module).

    ${unclip.precision:}      "bf16-mixed" on a GPU with bf16 support, else "32-true"
    ${unclip.wandb_offline:}  True unless W&B credentials exist (WANDB_API_KEY, or `wandb login`'s netrc entry)
                              or WANDB_MODE=online: W&B must never stop a job at an interactive login prompt
    ${unclip.net_channels:C,L}  a UNet's output channels for C image channels: 2C when L (learn_sigma) is true
"""

from __future__ import annotations

import netrc
import os

from omegaconf import OmegaConf

__all__ = ["register_resolvers", "wandb_offline", "default_precision", "net_channels"]


def default_precision() -> str:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
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


def register_resolvers() -> None:
    resolvers = {"unclip.precision": default_precision, "unclip.wandb_offline": wandb_offline,
                 "unclip.net_channels": net_channels}
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
