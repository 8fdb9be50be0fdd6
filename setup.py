from setuptools import find_packages, setup

setup(
    name="verl_omni",
    version="0.1.0",
    description="Diffusion rollout backend (vllm-omni / diffusers) and FlowGRPO for verl",
    packages=find_packages(include=["verl_omni", "verl_omni.*"]),
    python_requires=">=3.10",
    install_requires=[
        # verl-core brings what verl's agent loop and trainer import (cachetools, uvicorn, fastapi, TransferQueue).
        "verl[verl-core]==0.9.1",
        "diffusers==0.38.0",
        # diffusers 0.38 accepts safetensors>=0.8.0rc0, so pip would pick a pre-release without this pin.
        "safetensors==0.8.0",
        "transformers>=5.5.3,<5.11",
        "peft",
        "ray",
        "numpy",
        "pillow",
        "torch",  # not pinned: CPU CI installs torch==2.13.0 first; GPU users keep their CUDA build
        "hydra-core",
        "pandas",
        "pyarrow",
        "tensorboard",
        "rapidocr",
        "onnxruntime",
        "fastapi",
        "uvicorn",
        "tqdm",
    ],
    extras_require={
        "vllm-omni": ["vllm-omni==0.24.0", "vllm==0.24.0"],
        "test": ["pytest", "pytest-timeout"],
    },
    entry_points={
        # verl imports every entry point of this group in each process (driver and Ray workers).
        "verl.plugins": ["verl_omni = verl_omni"],
        "console_scripts": ["verl-omni-flowgrpo = verl_omni.trainer.main_flowgrpo:main"],
    },
    include_package_data=True,
    package_data={"verl_omni": ["trainer/config/*.yaml"]},
)
