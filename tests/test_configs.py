"""Every shipped experiment composes, resolves and builds (its net on the meta device, so the 280M presets cost
nothing); every net preset has the parameter count docs/NETS.md states."""

from __future__ import annotations

import functools

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from tests.conftest import CONF

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith("_"))

# The parameter counts docs/NETS.md lists for each preset.
NET_PARAMETERS = {
    "prior_tiny": 33_024, "prior_shapes": 7_803_392, "prior_25m": 24_210_944, "prior_peer": 88_663_296,
    "decoder_tiny": 63_931, "decoder_shapes": 26_796_163, "decoder_200m": 221_685_891,
    "decoder_peer": 280_082_179, "upsampler_tiny": 50_355, "upsampler_shapes": 22_876_739,
    "upsampler_1024": 282_797_955,
}


def meta_parameters(net_cfg) -> int:
    """Parameters of a net config; a training config's partial gets placeholder widths for those the CLIP sets."""
    with torch.device("meta"):
        net = instantiate(net_cfg)
        if isinstance(net, functools.partial):
            net = net(**{k: 64 for k, v in net.keywords.items() if v is None})
    return sum(p.numel() for p in net.parameters())


def test_experiment_list_is_complete():
    assert {"tiny_clip", "demo_decoder", "shapes_upsampler", "imagenet_prior", "laion_decoder"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_resolves_and_builds(experiment, compose_cfg, tmp_path):
    cfg = compose_cfg("train", [f"experiment={experiment}"], tmp_path)
    with open_dict(cfg):
        del cfg["hydra"]
    missing = OmegaConf.missing_keys(cfg)  # what the user must pass: their data, or the CLIP stage's checkpoint
    assert missing <= {"clip.checkpoint", "data.train_shards", "data.val_shards"}
    if not experiment.startswith(("imagenet_", "laion_")):
        assert missing <= {"clip.checkpoint"}  # the embedded data needs no path
    for key in missing:
        OmegaConf.update(cfg, key, str(tmp_path / key))
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # no dangling interpolation
    assert container["trainer"]["max_steps"] > 0
    net = cfg.model.get("net")
    if net is not None:
        assert meta_parameters(net) > 0
    if "data" in cfg:
        instantiate(cfg.data)  # argument checks run in the constructor; no shard is read
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None and "_target_" in c]
    assert any(type(c).__name__ == "ModelCheckpoint" for c in callbacks)


@pytest.mark.parametrize("preset", sorted(NET_PARAMETERS))
def test_net_preset_has_the_documented_size(preset):
    cfg = OmegaConf.load(CONF / "model" / "net" / f"{preset}.yaml")
    assert meta_parameters(cfg) == NET_PARAMETERS[preset]


def test_every_net_preset_is_documented():
    presets = {p.stem for p in (CONF / "model" / "net").glob("*.yaml")}
    assert presets - {"prior_demo", "decoder_demo", "upsampler_demo", "upsampler_256"} == set(NET_PARAMETERS)


def test_cpu_precision_is_bf16_only_where_the_cpu_has_amx(monkeypatch):
    """The CPU study's decoder trains in bf16 on AMX CPUs and in fp32 elsewhere (emulated bf16 is slower)."""
    from unclip.config import cpu_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cpu_precision() == "bf16-mixed"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert cpu_precision() == "32-true"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert cpu_precision() == "32-true"
    assert OmegaConf.create({"p": "${unclip.cpu_precision:}"}).p == "32-true"  # registered as a resolver


def test_cpu_clip_layouts(compose_cfg, tmp_path):
    """The demo's and the study's CLIP are one process of 64 pairs (faster on two cores than two ranks, and the
    better CLIP at the same minutes); the study's two-rank layout of runs up to j is two overrides away. Each
    gives every caption 63 in-batch negatives."""
    demo = compose_cfg("train", ["experiment=demo_clip"], tmp_path / "demo")
    study = compose_cfg("train", ["experiment=study_clip"], tmp_path / "study")
    ranks = compose_cfg("train", ["experiment=study_clip", "trainer=cpu_ddp", "data.batch_size=32"], tmp_path / "ranks")
    for cfg in (demo, study):
        assert (cfg.trainer.devices, cfg.data.batch_size, cfg.trainer.strategy) == (1, 64, "auto")
    assert study.data.train_shards.endswith("shapes_study/train/*.tar") and study.data.image_size == 32
    assert (ranks.trainer.devices, ranks.data.batch_size) == (2, 32)
    assert ranks.trainer.strategy._target_.endswith("DDPStrategy")
