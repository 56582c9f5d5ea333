"""OmegaConf resolvers the configs use (registered on import; entry points and tests import this module).

    ${unclip.precision:}      "bf16-mixed" on a GPU with bf16 support, else "32-true"
    ${unclip.wandb_offline:}  True unless W&B credentials exist (WANDB_API_KEY, or `wandb login`'s netrc entry)
                              or WANDB_MODE=online: W&B must never stop a job at an interactive login prompt
"""

from __future__ import annotations

import netrc
import os

from omegaconf import OmegaConf

__all__ = ["register_resolvers", "wandb_offline", "default_precision"]


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


def register_resolvers() -> None:
    for name, fn in {"unclip.precision": default_precision, "unclip.wandb_offline": wandb_offline}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
