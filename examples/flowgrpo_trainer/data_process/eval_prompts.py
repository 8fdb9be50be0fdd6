"""Write small held-out evaluation prompt files for ``python -m verl_omni.eval``.

- ``ocr_eval.txt``: flow_grpo's OCR test format, one prompt per line, the text to render in double quotes. Its
  scenes and words are disjoint from ``qwenimage_ocr.py``'s training prompts, so a trained policy is scored on
  text it never saw.
- ``geneval_style.jsonl``: GenEval's metadata format (one object per line: ``prompt``, ``tag``, ``include`` with
  the objects' ``class``, ``count`` and optional ``color``), for a GenEval scoring service reached through the
  ``http`` reward (``--preset geneval --reward-url ...``).

Every file is generated from the seed; nothing is downloaded.

Usage: python eval_prompts.py --local_dir ~/data/eval_prompts --ocr_size 32 --geneval_size 24 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random

OCR_SCENES = (
    'A paper lantern glowing at dusk with the word "{text}" painted on it',
    'A vintage typewriter page that reads "{text}"',
    'A hand-lettered wooden crate stamped "{text}"',
    'A museum placard beside a painting titled "{text}"',
    'A stitched patch on a denim jacket that says "{text}"',
    'A bus destination display showing "{text}"',
    'A frosted bakery window with "{text}" etched into the glass',
    'A chalk drawing on a sidewalk spelling "{text}"',
)
OCR_WORDS = (
    "Aurora", "Basil", "Canyon", "Dynamo", "Ember", "Falcon", "Glacier", "Harvest", "Indigo", "Juniper",
    "Kettle", "Lagoon", "Meadow", "Nimbus", "Orchid", "Pebble", "Quartz", "Ripple", "Saffron", "Thistle",
    "Umbra", "Velvet", "Willow", "Zephyr",
)  # fmt: skip

GENEVAL_OBJECTS = ("cat", "dog", "bench", "umbrella", "bicycle", "cup", "clock", "apple", "car", "chair")
GENEVAL_COLORS = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "color_attr")


def make_ocr_eval_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct prompts, each word rendered in one scene; one or two words per target."""
    rng = random.Random(seed)
    candidates = [(s, w) for s in OCR_SCENES for w in OCR_WORDS]
    candidates += [(s, f"{a} {b}") for s in OCR_SCENES for a in OCR_WORDS for b in OCR_WORDS if a < b]
    if n > len(candidates):
        raise ValueError(f"--ocr_size={n}: the generator makes at most {len(candidates)} distinct prompts")
    return [scene.format(text=text) for scene, text in rng.sample(candidates, n)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _geneval_row(tag: str, rng: random.Random) -> dict:
    a, b = rng.sample(GENEVAL_OBJECTS, 2)
    if tag == "single_object":
        return {"tag": tag, "include": [{"class": a, "count": 1}], "prompt": f"a photo of {_article(a)} {a}"}
    if tag == "two_object":
        include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
        return {"tag": tag, "include": include, "prompt": f"a photo of {_article(a)} {a} and {_article(b)} {b}"}
    if tag == "counting":
        count = rng.choice(sorted(NUMBER_WORDS))
        return {
            "tag": tag,
            "include": [{"class": a, "count": count}],
            "prompt": f"a photo of {NUMBER_WORDS[count]} {a}s",
        }
    color = rng.choice(GENEVAL_COLORS)
    if tag == "colors":
        include = [{"class": a, "count": 1, "color": color}]
        return {"tag": tag, "include": include, "prompt": f"a photo of {_article(color)} {color} {a}"}
    other = rng.choice([c for c in GENEVAL_COLORS if c != color])
    include = [{"class": a, "count": 1, "color": color}, {"class": b, "count": 1, "color": other}]
    prompt = f"a photo of {_article(color)} {color} {a} and {_article(other)} {other} {b}"
    return {"tag": tag, "include": include, "prompt": prompt}


def make_geneval_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` GenEval-style rows, the tags taken in turn."""
    rng = random.Random(seed)
    return [_geneval_row(GENEVAL_TAGS[i % len(GENEVAL_TAGS)], rng) for i in range(n)]


def write_eval_prompts(local_dir: str, ocr_size: int, geneval_size: int, seed: int) -> tuple[str, str]:
    os.makedirs(local_dir, exist_ok=True)
    ocr_path = os.path.join(local_dir, "ocr_eval.txt")
    with open(ocr_path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in make_ocr_eval_prompts(ocr_size, seed))
    geneval_path = os.path.join(local_dir, "geneval_style.jsonl")
    with open(geneval_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in make_geneval_rows(geneval_size, seed))
    return ocr_path, geneval_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local_dir", default="~/data/eval_prompts")
    parser.add_argument("--ocr_size", type=int, default=32)
    parser.add_argument("--geneval_size", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write_eval_prompts(os.path.expanduser(args.local_dir), args.ocr_size, args.geneval_size, args.seed):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
