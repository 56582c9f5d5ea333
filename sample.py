"""Generate images.  python sample.py pipeline.prior=P pipeline.decoder=D 'pipeline.upsamplers=[U]' prompt="..." """

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from unclip.sample import sample

    result = sample(cfg)
    print(f"images: {result['out_dir']}/images  grid: {result['grid']}")


if __name__ == "__main__":
    main()
