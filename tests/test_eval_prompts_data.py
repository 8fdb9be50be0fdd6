"""The evaluation prompt generator (examples/.../data_process/eval_prompts.py) writes files the evaluation reads:
OCR prompts held out from the training generator's, and GenEval-style metadata lines."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from verl_omni.eval.prompts import load_prompts
from verl_omni.rewards.ocr import extract_quoted_target

FOLDER = Path(__file__).resolve().parents[1] / "examples/flowgrpo_trainer/data_process"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, FOLDER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_writes_held_out_ocr_prompts_and_geneval_lines(tmp_path):
    args = ["--local_dir", str(tmp_path), "--ocr_size", "20", "--geneval_size", "10", "--seed", "1"]
    subprocess.run([sys.executable, str(FOLDER / "eval_prompts.py"), *args], check=True, capture_output=True)
    ocr = load_prompts(str(tmp_path / "ocr_eval.txt"))
    assert len({p.text for p in ocr}) == 20
    targets = {extract_quoted_target(p.text) for p in ocr}
    train = _load("qwenimage_ocr")
    train_words = {w.lower() for t in train._candidate_targets() for w in t.split()}
    assert not {w.lower() for t in targets for w in t.split()} & train_words  # words the training set never shows
    assert (tmp_path / "ocr_eval.txt").read_text() == "\n".join(
        _load("eval_prompts").make_ocr_eval_prompts(20, 1)
    ) + "\n"

    geneval = load_prompts(str(tmp_path / "geneval_style.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "geneval_style.jsonl").read_text().splitlines()]
    assert len(geneval) == 10 and {r["tag"] for r in rows} == set(_load("eval_prompts").GENEVAL_TAGS)
    counting = next(r for r in rows if r["tag"] == "counting")
    assert counting["include"][0]["count"] > 1 and counting["include"][0]["class"] in counting["prompt"]
    assert geneval[0].metadata["extra_info"]["include"] == rows[0]["include"]
