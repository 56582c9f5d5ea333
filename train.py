"""Train one unCLIP stage.  python train.py experiment=tiny_prior | python train.py model=prior trainer.devices=8"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from unclip.train import train

    result = train(cfg)
    metric = cfg.get("optimized_metric")
    return result["metrics"].get(metric) if metric else None


if __name__ == "__main__":
    main()
