"""Evaluate a stage checkpoint or a whole pipeline.  python evaluate.py ckpt=outputs/.../last.ckpt"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from unclip.evaluate import evaluate

    result = evaluate(cfg)
    print(result["table"])
    print(f"report: {result['json']}  {result['markdown']}")


if __name__ == "__main__":
    main()
