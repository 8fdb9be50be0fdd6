"""Rewards: registry, weighted manager, custom functions, loud failures, OCR and JPEG scores."""

import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from verl_omni.rewards import (
    RewardComputationError,
    RewardManager,
    RewardTimeoutError,
    get_reward_fn,
    register_reward,
)
from verl_omni.rewards.ocr import extract_quoted_target, levenshtein_distance, ocr_text_score


def render_text(text: str, size=(512, 128)) -> np.ndarray:
    """Large black text on white: what a well-trained model should produce."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((24, 30), text, fill="black", font=ImageFont.load_default(size=56))
    return np.asarray(image)


def flat(value: int, size=(64, 64)) -> np.ndarray:
    return np.full((*size, 3), value, dtype=np.uint8)


# ---------------------------------------------------------------- registry


def test_unknown_reward_names_itself_and_the_allowed_names():
    with pytest.raises(ValueError) as err:
        get_reward_fn("no_such_reward")
    assert "no_such_reward" in str(err.value)
    assert "ocr" in str(err.value) and "jpeg" in str(err.value)


def test_registering_a_second_function_under_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_reward("brightness")(lambda images, prompts, metadata: [0.0] * len(images))


# ---------------------------------------------------------------- manager


def test_weighted_sum_and_per_reward_scores():
    images = [flat(0), flat(255), flat(51)]
    manager = RewardManager({"rewards": [{"name": "brightness", "weight": 2.0}, {"name": "redness", "weight": -1.0}]})
    result = manager(images, ["a", "b", "c"], [{}, {}, {}])

    np.testing.assert_allclose(result.per_reward["brightness"], [0.0, 1.0, 0.2])
    np.testing.assert_allclose(result.per_reward["redness"], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(result.total, [0.0, 2.0, 0.4])
    metrics = result.metrics()
    assert metrics["reward/brightness/mean"] == pytest.approx(0.4)
    assert metrics["reward/brightness/std"] == pytest.approx(np.std([0.0, 1.0, 0.2]))
    assert metrics["reward/total/mean"] == pytest.approx(0.8)


def test_redness_separates_red_from_grey():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    scores = get_reward_fn("redness")([red, flat(128, (8, 8))], ["", ""], [{}, {}])
    assert scores[0] == pytest.approx(1.0) and scores[1] == pytest.approx(0.0)


def test_custom_reward_function_loaded_from_a_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(
        "def prompt_length(images, prompts, metadata, scale=1.0):\n    return [scale * len(p) for p in prompts]\n"
    )
    manager = RewardManager(
        {
            "rewards": [{"name": "brightness", "weight": 1.0}],
            "custom_reward_function": {
                "path": str(path),
                "name": "prompt_length",
                "weight": 0.5,
                "reward_kwargs": {"scale": 2.0},
            },
        }
    )
    result = manager([flat(255), flat(0)], ["abc", "a"], None)
    np.testing.assert_allclose(result.per_reward["custom/prompt_length"], [6.0, 2.0])
    np.testing.assert_allclose(result.total, [1.0 + 3.0, 0.0 + 1.0])


def test_unknown_keys_in_a_reward_entry_are_rejected_naming_key_reward_and_allowed_keys(tmp_path):
    with pytest.raises(ValueError) as err:
        RewardManager({"rewards": [{"name": "brightness", "wieght": 2.0}]})
    message = str(err.value)
    assert "wieght" in message and "brightness" in message
    assert all(k in message for k in ("name", "weight", "timeout_s"))
    path = tmp_path / "r.py"
    path.write_text("def f(images, prompts, metadata):\n    return [0.0] * len(images)\n")
    with pytest.raises(ValueError) as err:
        RewardManager({"custom_reward_function": {"path": str(path), "name": "f", "kwargs": {}}})
    message = str(err.value)
    assert "kwargs" in message and "'f'" in message
    assert all(k in message for k in ("path", "weight", "reward_kwargs", "timeout_s"))


def test_custom_reward_function_missing_file_or_name_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        RewardManager({"custom_reward_function": {"path": str(tmp_path / "absent.py"), "name": "f"}})
    path = tmp_path / "r.py"
    path.write_text("def other(images, prompts, metadata):\n    return [0.0] * len(images)\n")
    with pytest.raises(AttributeError, match="missing_fn"):
        RewardManager({"custom_reward_function": {"path": str(path), "name": "missing_fn"}})


def _custom_manager(tmp_path, body: str, **extra) -> RewardManager:
    path = tmp_path / "bad_reward.py"
    path.write_text(body)
    return RewardManager({"custom_reward_function": {"path": str(path), "name": "score", **extra}})


def test_a_raising_reward_names_the_reward_and_the_offending_sample(tmp_path):
    manager = _custom_manager(
        tmp_path,
        "def score(images, prompts, metadata):\n"
        "    return [1.0 / (len(p) - 4) for p in prompts]\n",  # "four" -> ZeroDivisionError
    )
    with pytest.raises(RewardComputationError) as err:
        manager([flat(0)] * 3, ["one", "three", "four"], None)
    message = str(err.value)
    assert "custom/score" in message and "sample 2" in message and "four" in message
    assert isinstance(err.value.__cause__, ZeroDivisionError)


def test_a_non_finite_reward_is_an_error_naming_the_sample(tmp_path):
    manager = _custom_manager(tmp_path, "def score(images, prompts, metadata):\n    return [0.0, float('nan'), 1.0]\n")
    with pytest.raises(RewardComputationError, match=r"custom/score.*sample 1 = nan.*'middle'"):
        manager([flat(0)] * 3, ["first", "middle", "last"], None)


def test_a_reward_returning_the_wrong_count_is_an_error(tmp_path):
    manager = _custom_manager(tmp_path, "def score(images, prompts, metadata):\n    return [0.0]\n")
    with pytest.raises(RewardComputationError, match="1 scores for 2 samples"):
        manager([flat(0)] * 2, ["a", "b"], None)


def test_a_slow_reward_times_out_with_its_name(tmp_path):
    manager = _custom_manager(
        tmp_path,
        "import time\ndef score(images, prompts, metadata):\n    time.sleep(1)\n    return [0.0] * len(images)\n",
        timeout_s=0.1,
    )
    start = time.monotonic()
    with pytest.raises(RewardTimeoutError, match=r"custom/score.*timeout_s=0.1"):
        manager([flat(0)], ["a"], None)
    assert time.monotonic() - start < 0.8


_HANGS = threading.Event()  # set at the end of the test that uses it: the abandoned reward thread then returns


@register_reward("test_never_returns")
def _never_returns(images, prompts, metadata):
    _HANGS.wait()
    return [0.0] * len(images)


def test_every_reward_has_a_default_timeout_named_by_its_key(tmp_path):
    from verl_omni.config.trainer import RewardConfig
    from verl_omni.rewards.registry import DEFAULT_REWARD_TIMEOUT_S, get_reward_factory, registered_rewards

    (tmp_path / "r.py").write_text("def score(images, prompts, metadata):\n    return [0.0] * len(images)\n")
    models = {  # model rewards (pickscore, clipscore): a stand-in function, as a RewardPool's workers get a client
        name: _never_returns for name in registered_rewards() if getattr(get_reward_factory(name), "model", False)
    }
    entries = [
        {
            "name": name,
            **({"path": "/models/x"} if "path" in getattr(get_reward_factory(name), "options", ()) else {}),
            **({"url": "http://127.0.0.1:9/s"} if name == "http" else {}),
        }
        for name in registered_rewards()
    ]
    manager = RewardManager(
        {"rewards": entries, "custom_reward_function": {"path": str(tmp_path / "r.py"), "name": "score"}},
        reward_fns=models,
    )
    timeouts = {spec.name: (spec.timeout_s, spec.timeout_key) for spec in manager.specs}
    assert {"ocr", "jpeg", "brightness", "redness", "pickscore", "custom/score"} <= set(timeouts)
    http = timeouts.pop("http")
    assert http == (None, f"reward.rewards[{registered_rewards().index('http')}].timeout_s")
    assert all(value == (DEFAULT_REWARD_TIMEOUT_S, "reward.default_timeout_s") for value in timeouts.values()), timeouts
    assert RewardConfig().as_dict()["default_timeout_s"] == DEFAULT_REWARD_TIMEOUT_S == 300.0
    # http bounds each of its requests itself (retries included), 60 s unless its entry says otherwise
    from verl_omni.rewards.registry import build_reward_fn

    assert build_reward_fn({"name": "http", "url": "http://127.0.0.1:9/s"}).timeout_s == 60.0


def test_a_reward_that_never_returns_fails_the_step_naming_the_reward_and_the_timeout_key(tmp_path):
    try:
        manager = RewardManager({"rewards": [{"name": "test_never_returns"}], "default_timeout_s": 0.2})
        with pytest.raises(
            RewardTimeoutError,
            match=r"reward 'test_never_returns' did not finish 2 samples .*reward.default_timeout_s=0.2",
        ):
            manager([flat(0)] * 2, ["a", "b"], None)
        own = RewardManager({"rewards": [{"name": "brightness"}, {"name": "test_never_returns", "timeout_s": 0.1}]})
        with pytest.raises(RewardTimeoutError, match=r"'test_never_returns' .*reward.rewards\[1\].timeout_s=0.1"):
            own([flat(0)], ["a"], None)
    finally:
        _HANGS.set()


@pytest.mark.parametrize("value", [0, -1, float("inf"), "60", True])
def test_a_bad_default_timeout_is_refused_naming_the_key(value):
    from verl_omni.config.trainer import RewardConfig

    with pytest.raises(ValueError, match="default_timeout_s"):
        RewardManager({"rewards": [{"name": "brightness"}], "default_timeout_s": value})
    if value not in ("60", True, float("inf")):
        with pytest.raises(ValueError, match="reward.default_timeout_s"):
            RewardConfig(default_timeout_s=value)


# ---------------------------------------------------------------- OCR


def test_ocr_score_is_high_for_the_right_text_and_low_for_a_wrong_one():
    images = [render_text("Open Cafe"), render_text("Golden Tiger"), render_text("Pixel Robot")]
    prompts = [
        'A storefront that says "Open Cafe"',
        'A poster titled "golden tiger"',  # case and spacing are normalised away, as in FlowGRPO
        'A neon sign that reads "Silver Moon"',
    ]
    scores = get_reward_fn("ocr")(images, prompts, [{}, {}, {}])
    assert scores[0] >= 0.9 and scores[1] >= 0.9
    assert scores[2] <= 0.5


def test_ocr_on_an_image_without_text_scores_zero():
    assert get_reward_fn("ocr")([flat(255, (128, 128))], ['say "Hello"'], [{}]) == [0.0]


def test_ocr_scores_the_ground_truth_from_the_trainers_metadata_over_the_prompts_quoted_text():
    meta = {
        "reward_model": {"style": "rule", "ground_truth": "Golden Tiger"},
        "data_source": "ocr",
        "extra_info": {"index": 0},
    }
    image = render_text("Golden Tiger")
    prompt = 'A poster titled "Silver Moon"'
    assert get_reward_fn("ocr")([image], [prompt], [meta])[0] >= 0.9
    assert get_reward_fn("ocr")([image], [prompt], [{}])[0] <= 0.5  # fallback: the quoted text


def test_ocr_prompt_without_quotes_is_a_loud_error_through_the_manager():
    manager = RewardManager({"rewards": [{"name": "ocr"}]})
    with pytest.raises(RewardComputationError, match=r"'ocr' failed on sample 1.*double quotes"):
        manager([render_text("Hi"), render_text("Hi")], ['a "Hi"', "no quotes here"], None)


def test_ocr_text_score_matches_flowgrpo_definition():
    assert extract_quoted_target('New York with "Hello World" in fireworks') == "Hello World"
    assert levenshtein_distance("kitten", "sitting") == 3
    assert ocr_text_score("HELLO WORLD", "hello world") == 1.0  # lower-cased, spaces dropped
    assert ocr_text_score("xx hello yy", "Hello") == 1.0  # target inside the recognised text
    assert ocr_text_score("hellp", "hello") == pytest.approx(0.8)  # one edit in five characters
    assert ocr_text_score("", "hello") == 0.0
    assert ocr_text_score("completely unrelated text", "abc") == 0.0  # distance capped at len(target)


# ---------------------------------------------------------------- JPEG


def test_jpeg_compressibility_prefers_a_flat_image_to_noise():
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    compress = get_reward_fn("jpeg")([flat(128, (128, 128)), noise], ["", ""], [{}, {}])
    size_kb = get_reward_fn("jpeg_incompressibility")([flat(128, (128, 128)), noise], ["", ""], [{}, {}])
    assert compress[0] > compress[1]
    assert size_kb[1] > size_kb[0] > 0
    # FlowGRPO: compressibility = -size_kB / 500
    np.testing.assert_allclose(compress, -np.asarray(size_kb) / 500)


# ---------------------------------------------------------------- value types


@pytest.mark.parametrize(
    "returned, bad_index, type_name",
    [
        ("[0.1, '0.5', 0.3]", 1, "str"),  # np.asarray(dtype=float64) would have read this as 0.5
        ("[0.1, 0.2, True]", 2, "bool"),
        ("[None, 0.2, 0.3]", 0, "NoneType"),
        ("[0.1, 1+2j, 0.3]", 1, "complex"),
        ("np.array([True, False, True])", 0, "bool"),
        ("np.array(['1', '2', '3'])", 0, "str"),
    ],
)
def test_a_reward_returning_non_numbers_is_an_error_naming_the_sample(tmp_path, returned, bad_index, type_name):
    manager = _custom_manager(
        tmp_path, f"import numpy as np\ndef score(images, prompts, metadata):\n    return {returned}\n"
    )
    prompts = ["first", "second", "third"]
    with pytest.raises(RewardComputationError) as err:
        manager([flat(0)] * 3, prompts, None)
    message = str(err.value)
    assert "custom/score" in message and f"sample {bad_index}" in message and prompts[bad_index] in message
    assert type_name in message


@pytest.mark.parametrize(
    "returned",
    [
        "[1, 2.5, np.float32(0.25)]",
        "np.array([1, 2.5, 0.25], dtype=np.float32)",
        "torch.tensor([1.0, 2.5, 0.25], dtype=torch.bfloat16)",
        "(1, 2.5, 0.25)",
    ],
)
def test_real_numbers_of_every_usual_container_are_accepted(tmp_path, returned):
    manager = _custom_manager(
        tmp_path, f"import numpy as np, torch\ndef score(images, prompts, metadata):\n    return {returned}\n"
    )
    result = manager([flat(0)] * 3, ["a", "b", "c"], None)
    np.testing.assert_array_equal(result.per_reward["custom/score"], [1.0, 2.5, 0.25])
    assert result.per_reward["custom/score"].dtype == np.float64


def test_a_reward_returning_a_string_instead_of_a_list_is_an_error(tmp_path):
    manager = _custom_manager(tmp_path, "def score(images, prompts, metadata):\n    return '0.5'\n")
    with pytest.raises(RewardComputationError, match=r"custom/score.*returned a str, not a sequence"):
        manager([flat(0)], ["a"], None)


def test_errors_name_the_callers_sample_ids_and_seconds_are_recorded(tmp_path):
    manager = _custom_manager(
        tmp_path, "def score(images, prompts, metadata):\n    return [1.0 / (len(p) - 4) for p in prompts]\n"
    )
    with pytest.raises(RewardComputationError, match=r"sample 41 \(prompt 'four'\)"):
        manager([flat(0)] * 2, ["three", "four"], None, sample_ids=[40, 41])
    result = RewardManager({"rewards": [{"name": "brightness"}]})([flat(0)], ["a"], None)
    assert set(result.seconds) == {"brightness"} and result.seconds["brightness"] >= 0
    assert "reward/brightness/seconds" in result.metrics()
