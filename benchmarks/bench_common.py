"""Helpers every GPU benchmark shares: logging, the measured bf16 matmul peak, the analytic transformer FLOPs and
the real-size random Qwen-Image builder (the faithful stand-in) with its parameters per component."""

from __future__ import annotations

import json
import math
import os
import time


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def measured_bf16_peak_tflops() -> float:
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    iters = 20
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 * iters / dt / 1e12


def transformer_flops_per_image(cfg: dict, image_tokens: int, text_tokens: int, steps: int, cfg_passes: int) -> float:
    layers = cfg["num_layers"] + cfg.get("num_single_layers", 0)  # FLUX: double- and single-stream blocks
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    seq = image_tokens + text_tokens
    per_forward = 2 * (12 * layers * width**2) * seq + layers * 4 * seq**2 * width
    return per_forward * steps * cfg_passes


def params_billion(folder: str) -> float:
    """bf16 safetensors bytes / 2 (the transformer is saved in bf16)."""
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    return size / 2 / 1e9


def _safetensors_numel(folder: str) -> int:
    """Values stored in a folder's safetensors files, read from their headers (no tensor is loaded)."""
    total = 0
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            total += sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")
    return total


def component_params(model_dir: str) -> dict[str, int]:
    """Values stored per component of a pipeline directory (the model folders holding safetensors)."""
    counts = {}
    for name in sorted(os.listdir(model_dir)):
        folder = os.path.join(model_dir, name)
        if os.path.isdir(folder) and any(f.endswith(".safetensors") for f in os.listdir(folder)):
            counts[name] = _safetensors_numel(folder)
    return counts


# Run in a child process for a GPU build, so the benchmark's own process starts no CUDA context for it.
_BUILD_IN_CHILD = "import sys; sys.path.insert(0, sys.argv[1]); import bench_common as b; b._build(*sys.argv[2:])"


def _build(
    path: str, layers: str, device: str, light_text_encoder: str, family: str = "qwen_image", variant: str = ""
) -> None:
    import torch

    depth = None if layers == "full" else int(layers)
    if light_text_encoder == "1":
        from verl_omni.pipelines.qwen_image.standin import build_qwen_image

        build_qwen_image(path, num_layers=depth or 60, full_width=True, seed=0, dtype=torch.bfloat16, device=device)
    else:
        from verl_omni.pipelines.standins import build_standin

        kwargs = {"variant": variant} if variant else {}
        build_standin(family, path, layers=depth, device=device, dtype=torch.bfloat16, seed=0, **kwargs)


def build_model(
    root: str,
    layers: int | None,
    device: str | None = None,
    light_text_encoder: bool = False,
    family: str = "qwen_image",
    variant: str | None = None,
) -> str:
    """The random real-size pipeline of ``family`` with ``layers`` transformer layers (None: the published depth)
    under ``root``, built once (a ``.complete`` marker); logs the parameters of every component.

    The model is the family's faithful stand-in (``verl_omni.pipelines.standins``: every component at the real
    checkpoint's architecture, size and vocabulary). For Qwen-Image, ``light_text_encoder=True`` gives the earlier
    model instead: the same transformer and VAE with a 2-layer, 3584-wide text encoder with a narrow MLP (~14 GB
    lighter). ``variant`` picks one of a family's checkpoints (Wan2.1: "1.3B" or "14B").

    ``device`` (default: "cuda" when a GPU exists) is where the weights are drawn (PyTorch's CPU random fills run
    on one thread, so a CPU build takes many minutes at the real size); a GPU build runs in a child process, so this
    process keeps no CUDA context from it. If it fails (no GPU, out of memory) that is logged and the model is
    built on the CPU instead.
    """
    import shutil
    import subprocess
    import sys

    import torch

    if light_text_encoder and family != "qwen_image":
        raise ValueError(f"light_text_encoder applies to qwen_image only, not {family!r}")
    kind = "full_width" if light_text_encoder else "standin"
    depth = "full" if layers is None else str(layers)
    name = f"qwen_image_{kind}_L{depth}" if family == "qwen_image" else f"{family}_{kind}_L{depth}"
    if variant:
        name += f"_{variant}"
    path = os.path.join(root, name)
    done = os.path.join(path, ".complete")
    if os.path.exists(done):
        log(f"model exists: {path}")
        _log_params(path)
        return path
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    args = [path, depth, device, "1" if light_text_encoder else "0", family, variant or ""]
    t0 = time.perf_counter()
    if torch.device(device).type == "cpu":
        _build(*args)
    else:
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device")
            here = os.path.dirname(os.path.abspath(__file__))
            subprocess.run([sys.executable, "-c", _BUILD_IN_CHILD, here, *args], check=True)
        except (RuntimeError, subprocess.CalledProcessError) as err:
            log(f"building on {device} failed ({type(err).__name__}: {err}); building on the CPU instead")
            shutil.rmtree(path, ignore_errors=True)
            device = "cpu"
            _build(path, depth, device, args[3], family, variant or "")
    open(done, "w").close()
    log(f"built {path} on {device} in {time.perf_counter() - t0:.0f} s")
    _log_params(path)
    return path


def model_summary(model_dir: str) -> dict:
    """What a benchmark ran on, for its report: the model (the stand-in's checkpoint and depth, or the light text
    encoder's model) and the values stored per component."""
    record_path = os.path.join(model_dir, "standin.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            rec = json.load(f)
        model = (
            f"stand-in of {rec['checkpoint']} (verl_omni.pipelines.standins): every component at its real size, "
            f"{rec['layers']} of {rec['published_layers']} transformer layers, random {rec['dtype']} weights"
        )
    elif "_full_width_" in os.path.basename(os.path.normpath(model_dir)):
        model = (
            "Qwen-Image transformer and VAE at the real size, 2-layer 3584-wide text encoder "
            "(verl_omni.pipelines.qwen_image.standin.build_qwen_image, full width), random bf16 weights"
        )
    else:
        model = f"the pipeline directory {model_dir}"
    return {"model": model, "params": component_params(model_dir)}


def _log_params(model_dir: str) -> None:
    counts = component_params(model_dir)
    log("parameters: " + ", ".join(f"{name} {n / 1e9:.3f}B" for name, n in counts.items()))


def write_report(report: dict, out: str) -> None:
    """Print the JSON report and write it to ``out`` (folders made as needed)."""
    text = json.dumps(report, indent=1)
    print(text)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    log(f"wrote {out}")


def append_run(record: dict, out: str) -> None:
    """Append one run's record to ``out``, a JSON list (created with its folders when missing)."""
    runs = []
    if os.path.exists(out):
        with open(out) as f:
            runs = json.load(f)
    runs.append(record)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(runs, f, indent=1)
    log(f"appended to {out}")
