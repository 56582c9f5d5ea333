"""The CLIP encoder every stage works with: the only module that imports open_clip.

unCLIP lives in CLIP's embedding space (Ramesh et al. 2022, section 2). This wrapper builds an open_clip model
from one of three sources and exposes exactly what the other stages consume:

    encode_text(captions) -> {"text_embed": (B, D), "text_tokens": (B, L, W), "text_mask": (B, L) bool}
    encode_image(images in [-1, 1], (B, 3, H, W)) -> (B, D)

Sources (exactly one):
    model_name + pretrained   an open_clip model name and a tag ("laion2b_s32b_b82k"), a local weights file,
                              or None for random init;
    architecture              an open_clip CLIP config (embed_dim, vision_cfg, text_cfg) given in YAML, so tiny
                              CLIPs for tests and small CLIPs for `shapes` are just configs (random init, seeded);
    checkpoint                a checkpoint written by this project's `clip` stage (takes precedence, so
                              `clip.checkpoint=PATH` works on top of any preset).

Frozen use (`trainable=False`, the default): eval mode, no gradients. Consumers keep the encoder out of their
optimizer and state dict and record `identity` instead (name, tag or file, embedding size, weights hash).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["ClipEncoder", "PretrainedUnavailableError", "state_dict_sha256", "imagenet_class_names"]


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names open_clip uses for zero-shot prompts (captions for `.cls` shards)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


class PretrainedUnavailableError(RuntimeError):
    """A pretrained tag needs a download that cannot happen on this machine."""


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 over names, dtypes, shapes and fp32 bytes of a module's state dict (order-independent)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def _host_reachable(url: str, timeout_s: float = 3.0) -> tuple[bool, str]:
    """Whether `url` answers an HTTPS request within `timeout_s` for the whole attempt (name lookup, connect,
    TLS, response), and why not. A TCP connect alone passes where HTTPS is blocked (open_clip's download then
    retries for most of a minute); the lookup alone can outlast a socket timeout, hence the thread."""
    import threading
    import urllib.error
    import urllib.request

    answer: list[str] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
            answer.append("")
        except urllib.error.HTTPError:  # an HTTP status (403, 404, ...) is still an answer
            answer.append("")
        except Exception as err:  # any other failure: not reachable
            answer.append(f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not answer:
        return False, f"no HTTPS answer from {url} within {timeout_s:g} s"
    return not answer[0], answer[0]


def _pretrained_source(model_name: str, tag: str, cache_dir: str | None) -> tuple[str, bool]:
    """Where an open_clip tag's weights come from, and whether they are already cached locally."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(
            f"clip.pretrained={tag!r} is neither a local file nor a known open_clip tag for {model_name!r}. "
            f"Known tags: {tags}"
        )
    if cfg.get("hf_hub"):
        repo_id, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" or "org/repo/file.bin"
        from huggingface_hub import try_to_load_from_cache

        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        cached = any(isinstance(try_to_load_from_cache(repo_id, n, cache_dir=cache_dir), str) for n in names)
        return f"https://huggingface.co/{repo_id}", cached
    url = cfg.get("url", "")
    root = Path(cache_dir or os.path.expanduser("~/.cache/clip"))
    cached = (root / os.path.basename(url)).is_file()
    return url, cached


class ClipEncoder(nn.Module):
    """A (usually frozen) open_clip model with the encodings unCLIP needs.

    Args:
        model_name: open_clip model name, e.g. "ViT-L-14".
        pretrained: open_clip tag, a local weights file, or None (random init).
        architecture: open_clip CLIP config dict (embed_dim, vision_cfg, text_cfg[, quick_gelu]); random init.
        checkpoint: a checkpoint of this project's `clip` stage.
        init_seed: seed of the random initialisation (architecture or untagged model), so it is reproducible.
        trainable: False freezes the encoder (eval mode, no gradients).
        cache_dir: download cache for pretrained tags.
        connect_timeout_s: how long the whole probe of the download host (lookup, connect, TLS, an HTTPS answer)
            may take before failing with a clear message.
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        architecture: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        init_seed: int = 0,
        trainable: bool = False,
        cache_dir: str | None = None,
        connect_timeout_s: float = 3.0,
    ) -> None:
        super().__init__()
        import open_clip

        if checkpoint is not None and (model_name is not None or architecture is not None):
            # `clip.checkpoint=PATH` on top of a preset: the checkpoint says what it is.
            log.info("clip.checkpoint is set: the CLIP is rebuilt from %s; model_name/architecture are ignored",
                     checkpoint)
            model_name, pretrained, architecture = None, None, None
        sources = [model_name is not None, architecture is not None, checkpoint is not None]
        if sum(sources) != 1:
            raise ValueError(
                "Give exactly one CLIP source: clip.model_name (+ clip.pretrained), clip.architecture, "
                f"or clip.checkpoint (got model_name={model_name!r}, architecture="
                f"{'set' if architecture else None}, checkpoint={checkpoint!r})."
            )
        if pretrained is not None and model_name is None:
            raise ValueError("clip.pretrained needs clip.model_name (the architecture the weights belong to).")

        source: dict[str, Any] = {}
        state_dict = None
        if checkpoint is not None:
            from unclip.checkpoint import load_stage_checkpoint

            ckpt = load_stage_checkpoint(checkpoint, expected_stage="clip")
            clip_cfg = ckpt["unclip"]["clip"]
            model_name, pretrained = clip_cfg.get("model_name"), None
            architecture = clip_cfg.get("architecture")
            prefix = "encoder.model."  # the clip stage registers the encoder as `encoder`
            state_dict = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
            source = {"checkpoint": str(checkpoint), "checkpoint_sha256": ckpt["file_sha256"]}

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            if architecture is not None:
                architecture = _plain(architecture)
                self.model = open_clip.CLIP(**architecture)
            else:
                self.model = self._create_named(model_name, pretrained, cache_dir, connect_timeout_s)
        if state_dict is not None:
            self.model.load_state_dict(state_dict, strict=True)

        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        preprocess = open_clip.get_model_preprocess_cfg(self.model)
        size = preprocess.get("size") or 224
        self.image_size = int(size if isinstance(size, int) else size[0])
        mean = torch.tensor(preprocess.get("mean") or OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(preprocess.get("std") or OPENAI_DATASET_STD).view(1, 3, 1, 1)
        self.register_buffer("image_mean", mean, persistent=False)
        self.register_buffer("image_std", std, persistent=False)

        if architecture is not None:
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(
                context_length=architecture.get("text_cfg", {}).get("context_length", 77)
            )
        else:
            self.tokenizer = open_clip.get_tokenizer(model_name)
        self.context_length = int(getattr(self.model, "context_length", self.tokenizer.context_length))
        with torch.no_grad():  # the embedding size as the model reports it, whatever its projection's type
            self.embed_dim = int(self.model.encode_text(self.tokenizer(["a"])).shape[-1])
        self.token_dim = int(self.model.ln_final.normalized_shape[0]) if hasattr(self.model, "ln_final") else None
        pad = getattr(getattr(self.tokenizer, "tokenizer", None), "pad_token_id", None)  # HF tokenizers
        self.pad_token_id = 0 if pad is None else int(pad)  # open_clip's BPE tokenizer pads with 0
        self.resize_mode = preprocess.get("resize_mode", "shortest")
        self.interpolation = preprocess.get("interpolation", "bicubic")
        self.trainable = trainable
        self.identity = {
            "model_name": model_name,
            "pretrained": pretrained,
            "architecture": architecture,
            "init_seed": init_seed if pretrained is None and state_dict is None else None,
            "embed_dim": self.embed_dim,
            "weights_sha256": state_dict_sha256(self.model),
            **source,
        }
        if not trainable:
            self.requires_grad_(False)
            self.eval()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _create_named(model_name: str, pretrained: str | None, cache_dir: str | None, timeout_s: float) -> nn.Module:
        import open_clip

        if pretrained is None or os.path.isfile(str(pretrained)):
            return open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir)
        url, cached = _pretrained_source(model_name, pretrained, cache_dir)
        if not cached:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            reachable, why = (False, "HF_HUB_OFFLINE is set") if offline else _host_reachable(url, timeout_s)
            if not reachable:
                raise PretrainedUnavailableError(
                    f"open_clip model {model_name!r} with pretrained={pretrained!r} needs its weights downloaded "
                    f"from {url}, which cannot be reached from this machine ({why}). Download the weights file "
                    f"elsewhere and pass it as a local file: clip.model_name={model_name} "
                    f"clip.pretrained=/path/to/open_clip_pytorch_model.bin (or fill the cache at "
                    f"{cache_dir or 'the default Hugging Face / ~/.cache/clip cache'})."
                )
        # Weights are cached (or the host answers): let open_clip load them, without network chatter if cached.
        env = {"HF_HUB_OFFLINE": "1"} if cached else {}
        with _environ(env):
            return open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir)

    # ------------------------------------------------------------------ frozen behaviour
    def train(self, mode: bool = True) -> ClipEncoder:
        """A frozen encoder stays in eval mode whatever its parent does."""
        return super().train(mode and self.trainable)

    def _grad_context(self):
        return contextlib.nullcontext() if self.trainable else torch.no_grad()

    # ------------------------------------------------------------------ text
    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids (B, context_length), truncated to the context; see `truncated` to report truncation."""
        return self.tokenizer(list(captions))

    def truncated(self, captions: list[str]) -> list[bool]:
        """Whether each caption is longer than the context (start and end tokens included)."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:
            return [False] * len(captions)
        return [len(encode(c)) + 2 > self.context_length for c in captions]

    def encode_text(self, text: list[str] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Captions (or token ids (B, L)) -> text_embed (B, D), text_tokens (B, L, W), text_mask (B, L) bool.

        text_tokens are the final-layer states after the final LayerNorm; text_mask marks real tokens (start,
        words, end), not padding.
        """
        device = self.image_mean.device
        tokens = text.to(device) if isinstance(text, torch.Tensor) else self.tokenize(text).to(device)
        with self._grad_context():
            out = self.model.forward_intermediates(
                text=tokens, text_indices=1, normalize_intermediates=True, normalize=False
            )
        return {
            "text_embed": out["text_features"],
            "text_tokens": out["text_intermediates"][-1],
            "text_mask": tokens != self.pad_token_id,
        }

    # ------------------------------------------------------------------ images
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W), any size -> CLIP input (B, 3, S, S), normalised with CLIP's mean/std.

        Follows the model's open_clip preprocessing: resize mode "shortest" (shorter side to S, center crop;
        the default), "longest" (longer side to S, padded) or "squash", with its interpolation.
        """
        x = (images.float() + 1) / 2
        s = self.image_size
        if x.shape[-2:] != (s, s):
            h, w = x.shape[-2:]
            mode = "bilinear" if self.interpolation == "bilinear" else "bicubic"
            resize = lambda y, size: F.interpolate(y, size=size, mode=mode, antialias=True, align_corners=False)  # noqa: E731
            if self.resize_mode == "squash":
                x = resize(x, (s, s))
            elif self.resize_mode == "longest":
                scale = s / max(h, w)
                x = resize(x, (min(s, round(h * scale)), min(s, round(w * scale))))
                ph, pw = s - x.shape[-2], s - x.shape[-1]
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            else:
                scale = s / min(h, w)
                size = (max(s, round(h * scale)), max(s, round(w * scale)))
                x = resize(x, size)
                top, left = (size[0] - s) // 2, (size[1] - s) // 2
                x = x[..., top : top + s, left : left + s]
        return (x.clamp(0, 1) - self.image_mean) / self.image_std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> image_embed (B, D) (not normalised)."""
        with self._grad_context():
            return self.model.encode_image(self.preprocess(images.to(self.image_mean.device)))


def _plain(cfg: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (open_clip and checkpoints want plain types)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg) if isinstance(cfg, dict) else cfg


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
