"""The trainer's Hydra config, ``flowgrpo_trainer.yaml``: a package, so that Hydra's ``pkg://`` search path finds it
wherever verl_omni is installed (the ``verl-omni-flowgrpo`` console script)."""
