"""Shared test setup: offline, CPU, small thread counts, and Hydra configs composed like the entry scripts."""

from __future__ import annotations

import os
from pathlib import Path

# Offline and quiet before anything imports the libraries that read these.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import unclip.config  # noqa: E402,F401  (config resolvers)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny nets run fastest on one thread (and do not fight other processes for cores); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data folder shared by the session (the tiny `shapes` set is generated into it once)."""
    path = tmp_path_factory.mktemp("data")
    os.environ["UNCLIP_DATA_DIR"] = str(path)
    return path


def compose(config_name: str, overrides: list[str], output_dir: Path, data_dir: Path):
    """The config an entry script would see, with the Hydra runtime (output dir, choices) filled in."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    os.environ["UNCLIP_DATA_DIR"] = str(data_dir)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture
def compose_cfg(data_dir):
    def make(config_name: str, overrides: list[str], output_dir: Path):
        return compose(config_name, overrides, output_dir, data_dir)

    return make


def train_stage(experiment: str, output_dir: Path, data_dir: Path, overrides: list[str] = ()) -> dict:
    """Run `python train.py experiment=<experiment> ...` in-process; returns train()'s result."""
    from unclip.train import train

    cfg = compose("train", [f"experiment={experiment}", *overrides], output_dir, data_dir)
    return train(cfg)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, data_dir) -> dict[str, Path]:
    """A tiny CLIP, prior, decoder (32 px) and upsampler (32 -> 64 px), each trained for a few CPU steps."""
    root = tmp_path_factory.mktemp("tiny_runs")
    runs = {
        "clip": ("tiny_clip", []),
        "prior": ("tiny_prior", []),
        "decoder": ("tiny_decoder", []),
        "upsampler": ("tiny_upsampler", ["model.net.image_size=64", "data.image_size=64", "data.lowres_size=32",
                                         "model.lowres_size=32"]),
    }
    out = {}
    for stage, (experiment, overrides) in runs.items():
        result = train_stage(experiment, root / stage, data_dir, ["trainer.max_steps=10", *overrides])
        out[stage] = Path(result["checkpoint"])
    return out
