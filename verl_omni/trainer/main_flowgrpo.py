"""Entry point: ``python -m verl_omni.trainer.main_flowgrpo [hydra overrides]``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="config", config_name="flowgrpo_trainer", version_base=None)
def main(config: DictConfig) -> None:
    run_flowgrpo(config)


def run_flowgrpo(config: DictConfig) -> list[dict]:
    import verl_omni  # noqa: F401  registers replicas and the agent loop in this process
    from verl_omni.trainer.ray_trainer import FlowGRPOTrainer

    OmegaConf.resolve(config)
    trainer = FlowGRPOTrainer(config)
    try:
        trainer.init()
        return trainer.fit()
    finally:
        trainer.shutdown()


if __name__ == "__main__":
    main()
