"""Entry point: ``verl-omni-flowgrpo [hydra overrides]`` or ``python -m verl_omni.trainer.main_flowgrpo [...]``.

A run that stops on purpose ends with one line on stderr and its own exit code: 128 + the signal number after
SIGTERM / SIGINT (143 / 130), ``NO_SIGNAL_EXIT_CODE`` (3) when its steps carry no learning signal.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from verl_omni.trainer.stopping import NoLearningSignalError, TrainingInterrupted


@hydra.main(config_path="config", config_name="flowgrpo_trainer", version_base=None)
def main(config: DictConfig) -> None:
    try:
        run_flowgrpo(config)
    except (TrainingInterrupted, NoLearningSignalError) as stop:  # the trainer has shut down and released the lock
        print(f"[verl_omni] {stop}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)


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
