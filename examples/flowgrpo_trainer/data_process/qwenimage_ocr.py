"""Write train/test parquet of text-rendering (OCR) prompts in verl's RL dataset format.

Prompts are generated locally from a seed (scene templates x short words/phrases), no downloads. Each prompt
holds its target text in double quotes, which is what the ``ocr`` reward reads (FlowGRPO's convention).
Columns follow verl's data_preprocess examples (gsm8k.py) so ``verl.utils.dataset.RLHFDataset`` reads them:

    data_source   "verl_omni/ocr_synthetic"
    prompt        [{"role": "user", "content": <prompt>}]
    ability       "text_rendering"
    reward_model  {"style": "rule", "ground_truth": <target text>}
    extra_info    {"split", "index", "target", "template_id"}

Usage: python qwenimage_ocr.py --local_dir ~/data/qwenimage_ocr --train_size 2048 --test_size 64 --seed 0
"""

from __future__ import annotations

import argparse
import os
import random

DATA_SOURCE = "verl_omni/ocr_synthetic"
ABILITY = "text_rendering"

SCENE_TEMPLATES = (
    'A neon sign on a brick wall at night that reads "{text}"',
    'A wooden signpost in a forest with the words "{text}" carved into it',
    'A coffee shop chalkboard menu with "{text}" written in white chalk',
    'A vintage movie poster with the title "{text}" in bold letters',
    'A birthday cake with "{text}" written in blue icing',
    'A T-shirt on a hanger printed with the slogan "{text}"',
    'A street banner hanging between two buildings saying "{text}"',
    'A hand-written note on yellow paper that says "{text}"',
    'A book cover with the title "{text}" in gold foil',
    'A storefront window with "{text}" painted in red letters',
    'A highway road sign that says "{text}"',
    'A coffee mug on a desk printed with the word "{text}"',
    'A protest placard held up in a crowd reading "{text}"',
    'A beach with "{text}" written in the sand',
    'A city skyline with "{text}" written with fireworks in the sky',
    'A glowing laptop screen showing the text "{text}"',
    'A delivery truck with "{text}" painted on its side',
    'A classroom whiteboard with "{text}" written in black marker',
    'A cereal box on a kitchen table labelled "{text}"',
    'A mountain trail sign reading "{text}"',
    'A minimalist logo design for a company called "{text}"',
    'A greeting card on a table with "{text}" in elegant script',
    'A graffiti mural on a train carriage spelling "{text}"',
    'A wine bottle with a label that says "{text}"',
)

WORDS = (
    "Open", "Closed", "Welcome", "Hello", "World", "Coffee", "Tea", "Bakery", "Books", "Music",
    "Sale", "Exit", "Garden", "River", "Sunset", "Dream", "Ocean", "Forest", "Pizza", "Tacos",
    "Jazz", "Happy", "Birthday", "Love", "Peace", "Hope", "Stop", "Go", "North", "South",
    "Market", "Studio", "Cinema", "Library", "Station", "Harbor", "Summit", "Valley", "Bridge", "Castle",
    "Rocket", "Planet", "Star", "Moon", "Lemon", "Mango", "Tiger", "Panda", "Robot", "Pixel",
    "Vintage", "Fresh", "Daily", "Night", "Morning", "Golden", "Silver", "Blue", "Green", "Red",
)  # fmt: skip

MAX_WORDS_PER_TARGET = 2


def _candidate_targets() -> list[str]:
    """All one- and two-word targets, in a fixed order (so a seed fully determines the output)."""
    singles = list(WORDS)
    pairs = [f"{a} {b}" for a in WORDS for b in WORDS if a != b]
    return singles + pairs


def _make_records(n: int, seed: int) -> list[tuple[str, str, int]]:
    """n distinct (prompt, target, template_id), reproducible from ``seed``."""
    targets = _candidate_targets()
    capacity = len(targets) * len(SCENE_TEMPLATES)
    if n > capacity:
        raise ValueError(f"asked for {n} distinct OCR prompts, the generator can make {capacity}")
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    records = []
    while len(records) < n:
        # Draw singles and pairs about equally often, so short targets are not swamped by the 3540 pairs.
        if rng.random() < 0.5:
            target_id = rng.randrange(len(WORDS))
        else:
            target_id = rng.randrange(len(WORDS), len(targets))
        template_id = rng.randrange(len(SCENE_TEMPLATES))
        if (target_id, template_id) in seen:
            continue
        seen.add((target_id, template_id))
        target = targets[target_id]
        records.append((SCENE_TEMPLATES[template_id].format(text=target), target, template_id))
    return records


def make_ocr_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct prompts, each with its target text in double quotes; same seed, same list."""
    return [prompt for prompt, _, _ in _make_records(n, seed)]


def make_ocr_rows(n: int, seed: int, split: str, index_offset: int = 0) -> list[dict]:
    """Rows in verl's RL dataset format (see module docstring)."""
    rows = []
    for i, (prompt, target, template_id) in enumerate(_make_records(n, seed)):
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": prompt}],
                "ability": ABILITY,
                "reward_model": {"style": "rule", "ground_truth": target},
                "extra_info": {"split": split, "index": index_offset + i, "target": target, "template_id": template_id},
            }
        )
    return rows


def write_ocr_parquet(local_dir: str, train_size: int, test_size: int, seed: int) -> tuple[str, str]:
    """Write train.parquet and test.parquet; the test prompts never repeat a train prompt."""
    import pandas as pd

    rows = make_ocr_rows(train_size + test_size, seed, split="train")
    train_rows, test_rows = rows[:train_size], rows[train_size:]
    for i, row in enumerate(test_rows):
        row["extra_info"]["split"] = "test"
        row["extra_info"]["index"] = i
    os.makedirs(local_dir, exist_ok=True)
    paths = os.path.join(local_dir, "train.parquet"), os.path.join(local_dir, "test.parquet")
    for path, split_rows in zip(paths, (train_rows, test_rows), strict=False):
        pd.DataFrame(split_rows).to_parquet(path, index=False)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local_dir", default="~/data/qwenimage_ocr")
    parser.add_argument("--train_size", type=int, default=2048)
    parser.add_argument("--test_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train_path, test_path = write_ocr_parquet(
        os.path.expanduser(args.local_dir), args.train_size, args.test_size, args.seed
    )
    print(f"wrote {args.train_size} rows to {train_path} and {args.test_size} rows to {test_path}")


if __name__ == "__main__":
    main()
