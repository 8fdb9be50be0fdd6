"""The evaluation command (verl_omni/eval) on the tiny Qwen-Image: a checkpoint's evaluation reproduces the run's own
validation scores for the same seeds; a report resumes where it stopped; OCR accuracy and exact match; presets."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from verl_omni.eval.__main__ import job_from, parser
from verl_omni.eval.ocr import RecordingOcr, ocr_exact_match
from verl_omni.eval.prompts import load_prompts
from verl_omni.eval.protocol import EvalProtocol
from verl_omni.eval.report import REPORT_FILE
from verl_omni.eval.runner import EvalJob, run_evaluation
from verl_omni.rollout.engines.diffusers import DiffusersEngine

PROMPTS = ['A sign that says "Hello"', 'A cake with "Happy Birthday" on it', 'A mug printed with "Coffee"']
SMALL = EvalProtocol(num_inference_steps=3, guidance_scale=1.0, height=64, width=64, images_per_prompt=2)


def _prompt_file(tmp_path, lines=PROMPTS):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n\n")
    return str(path)


def test_a_stopped_evaluation_resumes_with_only_the_missing_prompts(tiny_qwen_image_dir, tmp_path, monkeypatch):
    calls = []
    generate = DiffusersEngine.generate

    async def counted(self, prompt, seeds, params, request_id=None):
        calls.append(prompt)
        return await generate(self, prompt, seeds, params, request_id)

    monkeypatch.setattr(DiffusersEngine, "generate", counted)
    prompts, rewards = _prompt_file(tmp_path), [{"name": "brightness"}]
    job = EvalJob(tiny_qwen_image_dir, prompts, str(tmp_path / "out"), SMALL, rewards, batch_images=2)  # 1 prompt/call
    full = run_evaluation(job)
    assert calls == PROMPTS and full["summary"]["images"] == 6
    assert len({s for p in full["per_prompt"] for s in p["seeds"]}) == 6  # every image its own seed

    # A run stopped after two prompts leaves a report listing two: the rerun generates the third only.
    report_path = tmp_path / "out" / REPORT_FILE
    stopped = json.loads(report_path.read_text())
    stopped["per_prompt"], stopped["done"] = stopped["per_prompt"][:2], stopped["done"][:2]
    del stopped["summary"]
    report_path.write_text(json.dumps(stopped))
    calls.clear()
    resumed = run_evaluation(job)
    assert calls == PROMPTS[2:]
    assert resumed["per_prompt"] == full["per_prompt"] and resumed["summary"] == full["summary"]
    assert len(resumed["grids"]) == 1 and Image.open(resumed["grids"][0]).size[1] == 3 * (64 + 30)

    other = EvalJob(**{**job.__dict__, "protocol": SMALL.replace(num_inference_steps=4)})
    with pytest.raises(ValueError, match="'protocol' differs.*--overwrite"):
        run_evaluation(other)


@pytest.mark.parametrize("gpu", [False, True])
def test_device_and_dtype_default_to_the_gpu_in_bfloat16_where_one_is_visible(gpu, monkeypatch, tmp_path):
    """``--device auto`` / ``--dtype auto`` (the defaults): cuda in bfloat16 where a GPU is visible, else the CPU in
    float32; given values stay; the vllm-omni engine on the CPU is refused before anything loads."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    base = ["--base", str(tmp_path), "--prompts", "p.txt", "--out", str(tmp_path / "o"), "--reward", "jpeg"]
    job = job_from(parser().parse_args(base))
    assert (job.device, job.dtype) == (("cuda", "bfloat16") if gpu else ("cpu", "float32"))
    job = job_from(parser().parse_args([*base, "--device", "cpu", "--dtype", "float16"]))
    assert (job.device, job.dtype) == ("cpu", "float16")
    assert job_from(parser().parse_args([*base, "--device", "cpu"])).dtype == "float32"
    engine = ["--engine", "vllm_omni"]
    if gpu:
        assert job_from(parser().parse_args([*base, *engine])).device == "cuda"
    with pytest.raises(ValueError, match="--engine vllm_omni runs on a GPU, got --device cpu"):
        job_from(parser().parse_args([*base, *engine, "--device", "cpu" if gpu else "auto"]))


def test_summary_is_the_image_mean_with_the_standard_error_over_prompts(tiny_qwen_image_dir, tmp_path):
    job = EvalJob(tiny_qwen_image_dir, _prompt_file(tmp_path), str(tmp_path / "o"), SMALL, [{"name": "brightness"}])
    report = run_evaluation(job)
    scores = np.array([p["scores"]["brightness"] for p in report["per_prompt"]])  # [prompts, images]
    summary = report["summary"]["brightness"]
    assert summary["mean"] == pytest.approx(scores.mean())
    assert summary["stderr"] == pytest.approx(scores.mean(axis=1).std(ddof=1) / np.sqrt(3))
    assert summary["stderr"] > 0 and summary["n"] == 3


def _render(text):
    image = Image.new("RGB", (512, 128), "white")
    ImageDraw.Draw(image).text((24, 30), text, fill="black", font=ImageFont.load_default(size=56))
    return np.asarray(image)


def test_ocr_accuracy_is_the_reward_and_exact_match_needs_the_whole_text():
    recorder = RecordingOcr()
    prompts = ['A sign that says "hello world"', 'A sign that says "HELLO"', 'A sign that says "Goodbye"']
    scores = recorder([_render("HELLO WORLD")] * 3, prompts, [{}] * 3)
    rows = recorder.take()
    assert scores[0] == 1.0 and rows[0]["ocr_exact"]  # same text once lower-cased, spaces dropped
    assert scores[1] == 1.0 and not rows[1]["ocr_exact"]  # flow_grpo counts a contained target as read ...
    assert scores[2] < 0.5 and not rows[2]["ocr_exact"]  # ... exact match does not
    assert [r["ocr_target"] for r in rows] == ["hello world", "HELLO", "Goodbye"]
    assert ocr_exact_match("Hel lo", "hello") and not ocr_exact_match("hello!", "hello")
    ground_truth = recorder([_render("OPEN")], ["no quotes here"], [{"reward_model": {"ground_truth": "open"}}])
    assert ground_truth == [1.0]


def test_preset_sets_flow_grpo_ocr_protocol_and_flags_override_it(tiny_qwen_image_dir, tmp_path):
    base = ["--base", tiny_qwen_image_dir, "--prompts", _prompt_file(tmp_path), "--out", str(tmp_path)]
    job = job_from(parser().parse_args([*base, "--preset", "flowgrpo_ocr"]))
    p = job.protocol
    assert (p.num_inference_steps, p.guidance_scale, p.noise_level, p.height, p.images_per_prompt) == (
        40,
        4.5,
        0.0,
        512,
        1,
    )
    assert job.rewards == [{"name": "ocr", "weight": 1.0}]
    job = job_from(parser().parse_args([*base, "--preset", "flowgrpo_ocr", "--steps", "8", "--reward", "jpeg:0.5"]))
    assert job.protocol.num_inference_steps == 8 and job.protocol.guidance_scale == 4.5
    assert job.rewards == [{"name": "jpeg", "weight": 0.5}] and job.prefetch is None
    assert job.prefetch_prompts() == 16  # one call's prompts: 16 images a call, one a prompt
    assert job_from(parser().parse_args([*base, "--preset", "flowgrpo_ocr", "--prefetch", "0"])).prefetch == 0
    with pytest.raises(ValueError, match="--reward-url"):
        job_from(parser().parse_args([*base, "--preset", "geneval"]))
    job = job_from(parser().parse_args([*base, "--preset", "geneval", "--reward-url", "http://127.0.0.1:1/score"]))
    assert job.protocol.images_per_prompt == 4 and job.rewards[0]["url"] == "http://127.0.0.1:1/score"
    with pytest.raises(ValueError, match="--validation-step"):
        EvalProtocol(seed_scheme="validation")
    with pytest.raises(ValueError, match="evaluation protocol: height=72 must be a multiple of"):
        run_evaluation(EvalJob(tiny_qwen_image_dir, _prompt_file(tmp_path), str(tmp_path), SMALL.replace(height=72)))


def test_prompt_files_text_and_jsonl(tmp_path):
    assert [p.text for p in load_prompts(_prompt_file(tmp_path))] == PROMPTS
    geneval = tmp_path / "meta.jsonl"
    geneval.write_text('{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a bench"}\n')
    (prompt,) = load_prompts(str(geneval))
    assert prompt.text == "a bench" and prompt.metadata["extra_info"]["tag"] == "single_object"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="line 1: no string 'prompt'"):
        load_prompts(str(bad))
    with pytest.raises(ValueError, match="unknown format '.csv'"):
        (tmp_path / "p.csv").write_text("x")
        load_prompts(str(tmp_path / "p.csv"))


@pytest.mark.e2e
def test_evaluating_a_checkpoint_reproduces_the_runs_validation_scores(
    ray_session, ocr_data_files, tiny_qwen_image_dir, tmp_path, monkeypatch
):
    from helpers import trainer_config

    from verl_omni.trainer.ray_trainer import FlowGRPOTrainer

    metrics_file = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(metrics_file))
    run = tmp_path / "run"
    cfg = trainer_config(
        ocr_data_files,
        tiny_qwen_image_dir,
        run,
        **{
            "trainer.total_training_steps": 1,
            "trainer.save_freq": 1,
            "trainer.test_freq": 1,
            "trainer.logger": ["console", "file"],
        },
    )
    trainer = FlowGRPOTrainer(cfg).init()
    try:
        trainer.fit()
        validation = trainer.rollout(1, validate=True)  # the step-1 validation again, for its per-image scores
        per_image = trainer.score(validation)[0]
    finally:
        trainer.shutdown()
    logged = [json.loads(line)["data"] for line in metrics_file.read_text().splitlines()]
    val_mean = next(d["val/reward_mean"] for d in logged if "val/reward_mean" in d)

    rollout = cfg.actor_rollout_ref.rollout
    protocol = EvalProtocol(
        num_inference_steps=rollout.pipeline.num_inference_steps,
        guidance_scale=rollout.pipeline.true_cfg_scale,
        noise_level=rollout.val_kwargs.noise_level,
        height=rollout.pipeline.height,
        width=rollout.pipeline.width,
        images_per_prompt=rollout.val_kwargs.n,
        max_sequence_length=rollout.pipeline.max_sequence_length,
        seed=rollout.seed,
        seed_scheme="validation",
        validation_step=1,
        val_batch_size=cfg.data.val_batch_size,
    )
    rewards = [{"name": "brightness", "weight": 1.0}]
    _, test_file = ocr_data_files
    report = run_evaluation(
        EvalJob(tiny_qwen_image_dir, test_file, str(tmp_path / "eval"), protocol, rewards, str(run))
    )
    evaluated = [s for p in sorted(report["per_prompt"], key=lambda p: p["index"]) for s in p["scores"]["total"]]
    assert evaluated == pytest.approx(per_image.tolist(), abs=1e-6)
    assert report["summary"]["total"]["mean"] == pytest.approx(val_mean, abs=1e-6)
    meta = json.loads((run / "global_step_1" / "meta.json").read_text())
    assert report["checkpoint"]["checksum"] == meta["lora_checksum"] and report["checkpoint"]["alpha"] == 8.0
    base = run_evaluation(EvalJob(tiny_qwen_image_dir, test_file, str(tmp_path / "base"), protocol, rewards))
    assert base["summary"]["total"]["mean"] != pytest.approx(val_mean, abs=1e-6)  # the adapter is what is measured


def _rows(report):
    return sorted(report["per_prompt"], key=lambda p: p["index"])


def test_two_workers_write_the_report_of_one(tiny_qwen_image_dir, tmp_path):
    prompts = _prompt_file(tmp_path)
    # Calls of two prompts ([0, 1] and [2]): one per worker, the same calls as in one process.
    one = EvalJob(tiny_qwen_image_dir, prompts, str(tmp_path / "one"), SMALL, [{"name": "brightness"}], batch_images=4)
    reference = run_evaluation(one)
    report = run_evaluation(EvalJob(**{**one.__dict__, "out": str(tmp_path / "two"), "gpus": 2}))
    assert report["per_prompt"] == reference["per_prompt"] == _rows(reference)  # seeds and scores bit-identical
    assert report["summary"] == reference["summary"]
    assert report["done"] == [0, 1, 2] and report["timing"][-1]["devices"] == 2
    assert report["timing"][-1]["images"] == 6 and report["timing"][-1]["images_per_s"] > 0
    with pytest.raises(ValueError, match="--gpus 2 runs one worker per GPU with --device cuda"):
        run_evaluation(EvalJob(**{**one.__dict__, "gpus": 2, "device": "cuda:1"}))
    with pytest.raises(ValueError, match="--gpus must be an int >= 1"):
        EvalJob(tiny_qwen_image_dir, prompts, str(tmp_path), gpus=0)


def test_a_failing_worker_stops_the_run_and_a_rerun_evaluates_what_is_missing(tiny_qwen_image_dir, tmp_path):
    prompts = _prompt_file(tmp_path)
    job = EvalJob(
        tiny_qwen_image_dir, prompts, str(tmp_path / "two"), SMALL, [{"name": "brightness"}], gpus=2, batch_images=2
    )  # one prompt per call
    blocked = tmp_path / "two" / "images" / "00002_0.png"
    blocked.mkdir(parents=True)  # prompt 2's first image cannot be written
    with pytest.raises(RuntimeError, match=r"worker \d \(cpu\) failed on prompt 2 .*IsADirectoryError"):
        run_evaluation(job)
    report_path = tmp_path / "two" / REPORT_FILE
    kept = json.loads(report_path.read_text())
    reference = run_evaluation(EvalJob(**{**job.__dict__, "out": str(tmp_path / "one"), "gpus": 1}))
    # The worker that took prompt 2 had finished another one first: that row, and the other worker's, are kept.
    assert kept["per_prompt"] and 2 not in kept["done"]
    assert _rows(kept) == [reference["per_prompt"][i] for i in sorted(kept["done"])]

    # A rerun (its first kept row deleted as well) evaluates exactly the prompts missing from the report.
    blocked.rmdir()
    kept["per_prompt"], kept["done"] = kept["per_prompt"][1:], kept["done"][1:]
    report_path.write_text(json.dumps(kept))
    resumed = run_evaluation(job)
    assert resumed["timing"][-1]["prompts"] == 3 - len(kept["done"])
    assert resumed["per_prompt"] == reference["per_prompt"] and resumed["summary"] == reference["summary"]


def test_scoring_overlaps_the_next_generation_and_the_report_is_the_serial_one(
    tiny_qwen_image_dir, tmp_path, monkeypatch
):
    import threading

    import verl_omni.eval.generate as generate_module

    prompts = _prompt_file(tmp_path)
    serial = EvalJob(
        tiny_qwen_image_dir, prompts, str(tmp_path / "serial"), SMALL, [{"name": "brightness"}], batch_images=2
    )  # one prompt per call
    reference = run_evaluation(EvalJob(**{**serial.__dict__, "prefetch": 0}))

    # Prompt 0's images are saved only once the engine has started prompt 1: without overlap this never happens.
    second_started, overlapped = threading.Event(), []
    generate, save = DiffusersEngine.generate, generate_module.save_images

    async def watched(self, prompt, seeds, params, request_id=None):
        if prompt == PROMPTS[1]:
            second_started.set()
        return await generate(self, prompt, seeds, params, request_id)

    def save_after_the_next_started(folder, index, images, fps):
        if index == 0:
            overlapped.append(second_started.wait(timeout=60))
        return save(folder, index, images, fps)

    monkeypatch.setattr(DiffusersEngine, "generate", watched)
    monkeypatch.setattr(generate_module, "save_images", save_after_the_next_started)
    report = run_evaluation(EvalJob(**{**serial.__dict__, "out": str(tmp_path / "overlap"), "prefetch": 2}))
    assert overlapped == [True]
    assert report["per_prompt"] == reference["per_prompt"] and report["done"] == reference["done"] == [0, 1, 2]
    assert report["summary"] == reference["summary"]
    for row in report["per_prompt"]:  # the same images, byte for byte
        for name in row["images"]:
            assert (tmp_path / "overlap" / "images" / name).read_bytes() == (
                tmp_path / "serial" / "images" / name
            ).read_bytes()
    with pytest.raises(ValueError, match="--prefetch must be an int >= 0"):
        EvalJob(tiny_qwen_image_dir, prompts, str(tmp_path), prefetch=-1)


def test_a_failing_prompt_is_named_and_the_rows_before_it_are_kept(tiny_qwen_image_dir, tmp_path, monkeypatch):
    prompts = _prompt_file(tmp_path)
    job = EvalJob(tiny_qwen_image_dir, prompts, str(tmp_path / "out"), SMALL, [{"name": "brightness"}], batch_images=2)
    reference = run_evaluation(EvalJob(**{**job.__dict__, "out": str(tmp_path / "ref"), "prefetch": 0}))
    report_path = tmp_path / "out" / REPORT_FILE

    blocked = tmp_path / "out" / "images" / "00001_1.png"
    blocked.mkdir(parents=True)  # prompt 1's second image cannot be written
    with pytest.raises(RuntimeError, match=r"prompt 1 \('A cake.*IsADirectoryError"):
        run_evaluation(job)
    kept = json.loads(report_path.read_text())
    assert kept["done"] == [0] and kept["per_prompt"] == reference["per_prompt"][:1]
    blocked.rmdir()

    # A generation failure: the prompts generated before it are scored and kept, then the error names the prompt.
    generate = DiffusersEngine.generate

    async def failing(self, prompt, seeds, params, request_id=None):
        if prompt == PROMPTS[2]:
            raise MemoryError("out of memory")
        return await generate(self, prompt, seeds, params, request_id)

    monkeypatch.setattr(DiffusersEngine, "generate", failing)
    with pytest.raises(RuntimeError, match=r"prompt 2 \('A mug.*MemoryError: out of memory"):
        run_evaluation(job)
    kept = json.loads(report_path.read_text())
    assert kept["done"] == [0, 1] and kept["per_prompt"] == reference["per_prompt"][:2]
    monkeypatch.setattr(DiffusersEngine, "generate", generate)
    resumed = run_evaluation(job)
    assert resumed["per_prompt"] == reference["per_prompt"] and resumed["timing"][-1]["prompts"] == 1


def test_a_family_option_reaches_the_evaluation_engines_pipeline(tiny_flux_dir, tiny_sd3_dir, tmp_path):
    """--family-option KEY=VALUE is the family's own section for the engine's pipeline (FLUX's distilled guidance
    here), refused by its key before anything loads, and recorded with the report's model."""
    from verl_omni.eval.generate import load_engine
    from verl_omni.eval.runner import _header, check_family_options

    base = ["--base", tiny_flux_dir, "--prompts", _prompt_file(tmp_path), "--out", str(tmp_path), "--reward", "jpeg"]
    job = job_from(parser().parse_args([*base, "--family-option", "distilled_guidance_scale=6"]))
    assert job.family_options == {"distilled_guidance_scale": 6}
    engine = load_engine(job, None)
    assert engine.pipe.distilled_guidance_scale == 6.0
    assert _header(job, None, 1)["model"]["family_options"] == {"distilled_guidance_scale": 6}
    assert load_engine(job_from(parser().parse_args(base)), None).pipe.distilled_guidance_scale == 3.5
    bad = job_from(parser().parse_args([*base, "--family-option", "distilled_guidance_scale=-1"]))
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.model\.flux\.distilled_guidance_scale=-1"):
        check_family_options(bad)
    with pytest.raises(ValueError, match=r"must be KEY=VALUE"):
        job_from(parser().parse_args([*base, "--family-option", "distilled_guidance_scale"]))
    sd3 = EvalJob(tiny_sd3_dir, job.prompts, str(tmp_path), family_options={"distilled_guidance_scale": 6})
    with pytest.raises(ValueError, match=r"the sd3 family has no options section"):
        check_family_options(sd3)


MORE_PROMPTS = [*PROMPTS, 'A poster reading "Sale"', 'A small boat named "Rosa" in a quiet harbour at dawn']


def _image_values(folder, name):
    return np.asarray(Image.open(folder / "images" / name), dtype=np.int16)


def test_calls_of_several_prompts_give_the_report_of_one_prompt_per_call(tiny_qwen_image_dir, tmp_path, monkeypatch):
    """--batch-images 8 at 2 images a prompt: calls of prompts 0-3 and 4, each prompt with its own seeds. The report
    is the one of a prompt per call: the same rows, seeds and image files; every image value within one uint8 step
    (a batch of another composition changes only float rounding: tests/test_rl_pipelines.py bounds it), so each
    brightness score (the mean of the values / 255) within 1/255. A resumed report makes one call of what is
    missing."""
    calls = []
    generate, generate_rows = DiffusersEngine.generate, DiffusersEngine.generate_rows

    async def one(self, prompt, seeds, params, request_id=None):
        calls.append([prompt] * len(seeds))
        return await generate(self, prompt, seeds, params, request_id)

    async def rows(self, prompts, seeds, params, request_id=None):
        calls.append(list(prompts))
        return await generate_rows(self, prompts, seeds, params, request_id)

    monkeypatch.setattr(DiffusersEngine, "generate", one)
    monkeypatch.setattr(DiffusersEngine, "generate_rows", rows)
    prompts, rewards = _prompt_file(tmp_path, MORE_PROMPTS), [{"name": "brightness"}]
    single = EvalJob(tiny_qwen_image_dir, prompts, str(tmp_path / "single"), SMALL, rewards, batch_images=2)
    reference = run_evaluation(single)
    assert calls == [[p] * 2 for p in MORE_PROMPTS]
    calls.clear()
    batched = EvalJob(**{**single.__dict__, "out": str(tmp_path / "batched"), "batch_images": 8})
    report = run_evaluation(batched)
    assert calls == [[p for p in MORE_PROMPTS[:4] for _ in range(2)], [MORE_PROMPTS[4]] * 2]
    assert report["timing"][-1]["batch_images"] == 8 and report["timing"][-1]["images"] == 10
    # the steady figure leaves out the first call (the one that compiles on a GPU): its 8 images, then 4 of 2
    assert report["timing"][-1]["steady_images"] == 2 and reference["timing"][-1]["steady_images"] == 8

    def same_as_reference(got_report, folder):
        assert got_report["done"] == reference["done"] == [0, 1, 2, 3, 4]
        for got, want in zip(got_report["per_prompt"], reference["per_prompt"], strict=True):
            assert (got["index"], got["prompt"], got["seeds"], got["images"]) == (
                want["index"], want["prompt"], want["seeds"], want["images"]
            )  # fmt: skip
            for name in got["images"]:
                diff = np.abs(_image_values(folder, name) - _image_values(tmp_path / "single", name)).max()
                assert diff <= 1, name
            assert got["scores"]["brightness"] == pytest.approx(want["scores"]["brightness"], abs=1 / 255)
        print("largest score difference:", max(
            abs(a - b) for g, w in zip(got_report["per_prompt"], reference["per_prompt"], strict=True)
            for a, b in zip(g["scores"]["total"], w["scores"]["total"], strict=True)
        ))  # fmt: skip

    same_as_reference(report, tmp_path / "batched")

    # Stopped after two prompts: the rerun generates the other three in one call.
    report_path = tmp_path / "batched" / REPORT_FILE
    stopped = json.loads(report_path.read_text())
    stopped["per_prompt"], stopped["done"] = stopped["per_prompt"][:2], stopped["done"][:2]
    report_path.write_text(json.dumps(stopped))
    calls.clear()
    resumed = run_evaluation(batched)
    assert calls == [[p for p in MORE_PROMPTS[2:] for _ in range(2)]]
    same_as_reference(resumed, tmp_path / "batched")


@pytest.mark.parametrize("bad", [0, -16, True, 2.5, "16"])
def test_a_bad_batch_images_is_refused_naming_the_option(tiny_qwen_image_dir, tmp_path, bad):
    with pytest.raises(ValueError, match=r"--batch-images must be an int >= 1 \(images per engine call"):
        EvalJob(tiny_qwen_image_dir, _prompt_file(tmp_path), str(tmp_path), batch_images=bad)


def test_batch_images_holds_whole_prompts(tiny_qwen_image_dir, tmp_path):
    base = ["--base", tiny_qwen_image_dir, "--prompts", _prompt_file(tmp_path), "--out", str(tmp_path)]

    def job(*flags):
        return job_from(parser().parse_args([*base, "--reward", "jpeg", *flags]))

    assert job().batch_images == 16  # the default
    assert job("--images-per-prompt", "4").prompts_per_call() == 4
    assert job("--images-per-prompt", "4", "--batch-images", "7").prompts_per_call() == 1
    # a prompt of more images than --batch-images is a call of its own (never split)
    assert job("--images-per-prompt", "4", "--batch-images", "2").prompts_per_call() == 1
    with pytest.raises(ValueError, match="--batch-images must be an int >= 1"):
        job("--batch-images", "0")


def test_by_default_a_calls_scoring_overlaps_the_next_call(tiny_qwen_image_dir, tmp_path, monkeypatch):
    """Calls of 4 prompts (prompts 0-3, then 4): by default as many prompts as one call holds may wait for their
    scoring, so prompt 0's images are saved once the engine has started the next call (with 2, the engine would wait
    for prompts 0 and 1 first)."""
    import threading

    import verl_omni.eval.generate as generate_module

    next_call, overlapped = threading.Event(), []
    generate, save = DiffusersEngine.generate, generate_module.save_images

    async def watched(self, prompt, seeds, params, request_id=None):  # the last call: prompt 4 alone
        next_call.set()
        return await generate(self, prompt, seeds, params, request_id)

    def save_after_the_next_call_started(folder, index, images, fps):
        if index == 0:
            overlapped.append(next_call.wait(timeout=60))
        return save(folder, index, images, fps)

    monkeypatch.setattr(DiffusersEngine, "generate", watched)
    monkeypatch.setattr(generate_module, "save_images", save_after_the_next_call_started)
    prompts = _prompt_file(tmp_path, MORE_PROMPTS)
    job = EvalJob(tiny_qwen_image_dir, prompts, str(tmp_path / "o"), SMALL, [{"name": "brightness"}], batch_images=8)
    assert job.prefetch_prompts() == 4
    report = run_evaluation(job)
    assert overlapped == [True] and report["done"] == [0, 1, 2, 3, 4]
