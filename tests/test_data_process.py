"""The OCR prompt generator writes parquet that verl's RLHFDataset reads, reproducibly from a seed."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from verl_omni.rewards.ocr import extract_quoted_target

SCRIPT = Path(__file__).resolve().parents[1] / "examples/flowgrpo_trainer/data_process/qwenimage_ocr.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("qwenimage_ocr", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


qwenimage_ocr = _load_script()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ocr_data")
    subprocess.run(
        [sys.executable, str(SCRIPT), "--local_dir", str(out), "--train_size", "40", "--test_size", "8", "--seed", "3"],
        check=True,
        capture_output=True,
    )
    return out


def test_prompts_are_reproducible_from_the_seed_and_differ_across_seeds():
    assert qwenimage_ocr.make_ocr_prompts(50, seed=7) == qwenimage_ocr.make_ocr_prompts(50, seed=7)
    assert qwenimage_ocr.make_ocr_prompts(50, seed=7) != qwenimage_ocr.make_ocr_prompts(50, seed=8)


def test_every_prompt_is_distinct_and_quotes_its_target():
    prompts = qwenimage_ocr.make_ocr_prompts(500, seed=0)
    assert len(set(prompts)) == 500
    targets = [extract_quoted_target(p) for p in prompts]
    assert all(t.strip() and '"' not in t for t in targets)
    assert len(set(targets)) > 100  # words vary, not just the scene


def test_parquet_has_verls_columns_and_the_target_as_ground_truth(data_dir):
    train = pd.read_parquet(data_dir / "train.parquet")
    test = pd.read_parquet(data_dir / "test.parquet")
    assert len(train) == 40 and len(test) == 8
    assert set(train.columns) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    for split, frame in (("train", train), ("test", test)):
        for i, row in enumerate(frame.itertuples()):
            messages = list(row.prompt)
            assert len(messages) == 1 and messages[0]["role"] == "user"
            assert row.reward_model["style"] == "rule"
            assert row.reward_model["ground_truth"] == extract_quoted_target(messages[0]["content"])
            assert row.extra_info["split"] == split and row.extra_info["index"] == i
    train_prompts = {list(p)[0]["content"] for p in train.prompt}
    assert not train_prompts & {list(p)[0]["content"] for p in test.prompt}  # no test prompt leaks into train


def test_the_cli_output_is_reproducible(data_dir, tmp_path):
    again = tmp_path / "again"
    qwenimage_ocr.write_ocr_parquet(str(again), train_size=40, test_size=8, seed=3)
    pd.testing.assert_frame_equal(pd.read_parquet(data_dir / "train.parquet"), pd.read_parquet(again / "train.parquet"))


def test_verl_rlhf_dataset_reads_the_files(data_dir, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    # No tokenizer: the diffusion rollout tokenises itself, so length filtering is off.
    config = OmegaConf.create({"filter_overlong_prompts": False, "cache_dir": str(tmp_path / "verl_cache")})
    dataset = RLHFDataset(str(data_dir / "test.parquet"), tokenizer=None, config=config)
    assert len(dataset) == 8
    item = dataset[3]
    assert item["raw_prompt"][0]["role"] == "user"
    assert item["reward_model"]["ground_truth"] == extract_quoted_target(item["raw_prompt"][0]["content"])
    assert item["index"] == 3 and item["data_source"] == qwenimage_ocr.DATA_SOURCE
