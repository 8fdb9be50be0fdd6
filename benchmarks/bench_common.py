"""Helpers every GPU benchmark shares: logging, the measured bf16 matmul peak, the analytic transformer FLOPs and
the full-width random Qwen-Image builder."""

from __future__ import annotations

import json
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
    layers = cfg["num_layers"]
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    seq = image_tokens + text_tokens
    per_forward = 2 * (12 * layers * width**2) * seq + layers * 4 * seq**2 * width
    return per_forward * steps * cfg_passes


def params_billion(folder: str) -> float:
    """bf16 safetensors bytes / 2 (the transformer is saved in bf16)."""
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    return size / 2 / 1e9


def build_model(root: str, layers: int, device: str = "cpu") -> str:
    """The random full-width Qwen-Image of ``layers`` layers under ``root``, built once (a ``.complete`` marker).

    ``device="cuda"`` draws the weights on the GPU (PyTorch's CPU random fills run on one thread, so a CPU build
    takes minutes at the real size): only where nothing else uses that GPU at the time. If that build fails (no
    GPU, out of memory) it is logged and the model is built on the CPU instead.
    """
    import shutil

    import torch

    from verl_omni.pipelines.qwen_image.standin import build_qwen_image

    path = os.path.join(root, f"qwen_image_full_width_L{layers}")
    done = os.path.join(path, ".complete")
    if os.path.exists(done):
        log(f"model exists: {path}")
        return path
    t0 = time.perf_counter()
    try:
        build_qwen_image(path, num_layers=layers, full_width=True, seed=0, dtype=torch.bfloat16, device=device)
    except Exception as err:  # noqa: BLE001 - any failure of the device build falls back to the CPU, logged
        if torch.device(device).type == "cpu":
            raise
        log(f"building on {device} failed ({type(err).__name__}: {err}); building on the CPU instead")
        shutil.rmtree(path, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        device = "cpu"
        build_qwen_image(path, num_layers=layers, full_width=True, seed=0, dtype=torch.bfloat16, device=device)
    open(done, "w").close()
    log(f"built {path} on {device} in {time.perf_counter() - t0:.0f} s")
    return path


def write_report(report: dict, out: str) -> None:
    """Print the JSON report and write it to ``out`` (folders made as needed)."""
    text = json.dumps(report, indent=1)
    print(text)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    log(f"wrote {out}")
