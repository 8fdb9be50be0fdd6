"""Full fine-tuning's per-GPU memory (``actor_rollout_ref.model.lora_rank=0``) as the trainer's start-up check plans
it, for SD3.5-Medium, FLUX.1-dev and Qwen-Image at their recipe settings on 1, 2, 4 and 8 GPUs, with and without
``actor_rollout_ref.actor.optimizer_offload``.

The numbers come from the start-up check's own functions (``full_fine_tuning_plan_inputs`` in
verl_omni/trainer/ray_trainer.py, then ``plan_full_weights_memory``); the parameter counts from each family's
faithful stand-in built on the meta device (the real checkpoint's published configs; nothing is allocated or
downloaded). They are planned, not measured.

    python scripts/full_ft_memory_table.py            # the README's table (GiB per GPU)
    python scripts/full_ft_memory_table.py --full     # docs/architecture.md's table (every term)
    python scripts/full_ft_memory_table.py --write    # replace both tables in README.md and docs/architecture.md
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = os.path.join(REPO, "configs")
README = os.path.join(REPO, "README.md")
ARCHITECTURE = os.path.join(REPO, "docs", "architecture.md")
GPUS = (1, 2, 4, 8)
GiB = 1024**3


@dataclass(frozen=True)
class Recipe:
    model: str  # the name in the table
    family: str  # the stand-in family (verl_omni/pipelines/<family>/published.py)
    preset: str  # configs/<preset>.yaml
    overrides: tuple[str, ...] = ()  # what makes a LoRA preset a full fine-tuning run


FULL = ("actor_rollout_ref.model.lora_rank=0",)
RECIPES = (
    Recipe("SD3.5-Medium", "sd3", "sd3_5_medium_flowgrpo_ocr_full"),
    Recipe("FLUX.1-dev", "flux", "flux_flowgrpo_ocr_lora", FULL),
    Recipe("Qwen-Image", "qwen_image", "qwen_image_flowgrpo_ocr_full"),
)


def recipe_config(recipe: Recipe):
    """The preset composed as ``main_flowgrpo --config-dir configs --config-name <preset>`` composes it, parsed (the
    model path: the family's tiny model, which the plan does not read)."""
    from hydra import compose, initialize_config_dir

    from verl_omni.config.trainer import FlowGRPOConfig

    overrides = [*recipe.overrides, f"actor_rollout_ref.model.path=tiny:{recipe.family}"]
    with initialize_config_dir(config_dir=PRESETS, version_base=None):
        return FlowGRPOConfig.from_omega(compose(recipe.preset, overrides=overrides))


def standin_shape(family: str):
    """The ``PipelineShape`` of ``family``'s published checkpoint: its stand-in built on the meta device."""
    from verl_omni.models.standins import stored_counts
    from verl_omni.pipelines.standins import build_components
    from verl_omni.workers.full_weights import PipelineShape

    components = build_components(family, device="meta")
    vae = components["vae"]
    return PipelineShape(
        counts=stored_counts(components),
        transformer=dict(components["transformer"].config),
        vae={**vae.config, "_class_name": type(vae).__name__},  # as the directory's vae/config.json names it
    )


def plans(recipe: Recipe) -> dict[tuple[int, bool], object]:
    """{(GPUs, offload): FullWeightsMemory} of ``recipe``, planned by the start-up check's functions."""
    from verl_omni.trainer.ray_trainer import full_fine_tuning_plan_inputs
    from verl_omni.workers.full_weights import plan_full_weights_memory

    num_params, kwargs = full_fine_tuning_plan_inputs(recipe_config(recipe), standin_shape(recipe.family))
    return {(n, off): plan_full_weights_memory(num_params, n, off, **kwargs) for off in (False, True) for n in GPUS}


def _gib(n: int, digits: int = 1) -> str:
    return f"{n / GiB:.{digits}f}"


def readme_table(all_plans: dict[str, dict]) -> str:
    """One row per model: GiB per GPU on 1 / 2 / 4 / 8 GPUs, without / with the offload."""
    lines = [
        "| model (trained weights): GiB per GPU, offload off / on | 1 GPU | 2 GPUs | 4 GPUs | 8 GPUs |",
        "|---|---|---|---|---|",
    ]
    for recipe in RECIPES:
        p = all_plans[recipe.model]
        cells = [f"{_gib(p[n, False].device_total)} / {_gib(p[n, True].device_total)}" for n in GPUS]
        lines.append(f"| {recipe.model} ({p[1, False].num_params / 1e9:.2f}B) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_table(all_plans: dict[str, dict]) -> str:
    """Every term of every plan, GiB per GPU (host: what the offload keeps in host memory per GPU)."""
    lines = [
        "| model | offload | GPUs | weights | gradient shard | gradient buckets | master + AdamW shards | frozen "
        "components | policy copies | activations | rollout's VAE decode | total per GPU | host per GPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe in RECIPES:
        for off in (False, True):
            for n in GPUS:
                p = all_plans[recipe.model][n, off]
                shards = _gib(p.master + p.optimizer, 2) + (" (host)" if off else "")
                terms = [_gib(t, 2) for t in (p.weights, p.grads, p.buckets)] + [shards]
                copies = _gib(p.sharded_copies, 2) + (" (host)" if off and p.sharded_copies else "")
                terms += [_gib(p.frozen, 2), copies, _gib(p.activations, 2), _gib(p.decode, 2)]
                cells = [recipe.model, "on" if off else "off", str(n), *terms]
                cells += [_gib(p.device_total, 2), _gib(p.host_total, 2)]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def all_recipe_plans() -> dict[str, dict]:
    return {recipe.model: plans(recipe) for recipe in RECIPES}


def replace_table(path: str, table: str) -> None:
    """Replace the table in ``path`` whose header line is ``table``'s (the block of lines starting with "|")."""
    header = table.splitlines()[0]
    lines = open(path, encoding="utf-8").read().split("\n")
    if header not in lines:
        raise SystemExit(f"{path} has no table headed {header!r}: paste the table there first")
    start = lines.index(header)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[start:end] = table.splitlines()
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="every term of every plan (docs/architecture.md's table)")
    ap.add_argument("--write", action="store_true", help="replace the tables in README.md and docs/architecture.md")
    args = ap.parse_args()
    all_plans = all_recipe_plans()
    if args.write:
        replace_table(README, readme_table(all_plans))
        replace_table(ARCHITECTURE, full_table(all_plans))
        return
    print(full_table(all_plans) if args.full else readme_table(all_plans))


if __name__ == "__main__":
    main()
