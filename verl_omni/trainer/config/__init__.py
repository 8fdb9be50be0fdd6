"""The packaged trainer configs: Hydra search path ``pkg://verl_omni.trainer.config``, extended by configs/."""
