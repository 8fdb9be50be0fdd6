"""Shared, session-scoped fixtures: tiny random pipeline directories and the RL pipelines loaded from them."""

import pytest


@pytest.fixture(scope="session")
def tiny_qwen_image_dir():
    from verl_omni.pipelines.tiny import tiny_model_dir

    return tiny_model_dir("qwen_image")


@pytest.fixture(scope="session")
def tiny_sd3_dir():
    from verl_omni.pipelines.tiny import tiny_model_dir

    return tiny_model_dir("sd3")


@pytest.fixture(scope="session")
def tiny_flux_dir():
    from verl_omni.pipelines.tiny import tiny_model_dir

    return tiny_model_dir("flux")


@pytest.fixture(scope="session")
def tiny_wan_dir():
    from verl_omni.pipelines.tiny import tiny_model_dir

    return tiny_model_dir("wan")


@pytest.fixture(scope="session")
def tiny_wan2_2_ti2v_dir():
    from verl_omni.pipelines.tiny import tiny_model_dir

    return tiny_model_dir("wan2_2_ti2v")


@pytest.fixture(scope="session")
def tiny_wan2_2_t2v_dir():
    from verl_omni.pipelines.tiny import tiny_model_dir

    return tiny_model_dir("wan2_2_t2v")


@pytest.fixture(scope="session")
def qwen_image_rl_pipe(tiny_qwen_image_dir):
    from verl_omni.pipelines.qwen_image.pipeline import QwenImageRLPipeline

    pipe = QwenImageRLPipeline.from_pretrained(tiny_qwen_image_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sd3_rl_pipe(tiny_sd3_dir):
    from verl_omni.pipelines.sd3.pipeline import SD3RLPipeline

    pipe = SD3RLPipeline.from_pretrained(tiny_sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def flux_rl_pipe(tiny_flux_dir):
    from verl_omni.pipelines.flux.pipeline import FluxRLPipeline

    pipe = FluxRLPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _wan_rl_pipe(model_dir, **options):
    from verl_omni.pipelines.loading import load_rl_pipeline
    from verl_omni.pipelines.wan.options import WanOptions

    return load_rl_pipeline(model_dir, "wan", "float32", family_options=WanOptions(num_frames=5, **options))


@pytest.fixture(scope="session")
def wan_pipe(tiny_wan_dir):
    """The tiny Wan2.1 at 5 frames (2 latent frames), 8 fps."""
    return _wan_rl_pipe(tiny_wan_dir, fps=8)


@pytest.fixture(scope="session")
def ti2v_pipe(tiny_wan2_2_ti2v_dir):
    """The tiny Wan2.2-TI2V at 5 frames."""
    return _wan_rl_pipe(tiny_wan2_2_ti2v_dir)


@pytest.fixture(scope="session")
def a14b_pipe(tiny_wan2_2_t2v_dir):
    """The tiny two-expert Wan2.2-T2V-A14B at 5 frames."""
    return _wan_rl_pipe(tiny_wan2_2_t2v_dir)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole run (starting Ray costs seconds on 2 cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ocr_data_files(tmp_path_factory):
    """(train, test) parquet files of OCR prompts written by the example's data script (64 + 4 rows, seed 0)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "flowgrpo_trainer", "data_process"))
    from qwenimage_ocr import write_ocr_parquet

    return write_ocr_parquet(str(tmp_path_factory.mktemp("ocr_data")), 64, 4, 0)


@pytest.fixture(autouse=True)
def _unfreeze_gc_heap():
    """The actor freezes its process's GC heap after its first update (``actor.freeze_gc_heap``), right for a process
    that trains one model; this process runs many tests: each test's frozen objects become collectable again after it
    (a cycle among them would otherwise outlive the test)."""
    yield
    import gc

    gc.unfreeze()
