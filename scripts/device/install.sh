# Source on the GPU machine after every chunk is in /tmp/chunks:  . .device/cN/install.sh
# Reassembles the bundle, installs vllm (slim), vllm-omni, diffusers, ray (slim, when bundled) and missing wheels
# into /tmp/site, and exports the environment for them. Wheels whose distribution the image already has are skipped.
cat /tmp/chunks/part_* > /tmp/bundle.tar || return 1
rm -rf /tmp/bundle /tmp/site && mkdir -p /tmp/bundle /tmp/site && tar -xf /tmp/bundle.tar -C /tmp/bundle || return 1
rm -f /tmp/bundle.tar
tar -xJf /tmp/bundle/vllm_py.tar.xz -C /tmp/site || return 1
xz -T0 -dc /tmp/bundle/C.so.xz > /tmp/site/vllm/_C_stable_libtorch.abi3.so || return 1
xz -T0 -dc /tmp/bundle/fa3.so.xz > /tmp/site/vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so || return 1
if [ -f /tmp/bundle/ray_slim.tar.xz ]; then tar -xJf /tmp/bundle/ray_slim.tar.xz -C /tmp/site || return 1; fi
python3 - <<'PY' || return 1
import glob, os, subprocess, sys, importlib.metadata as md
todo = []
for w in sorted(glob.glob("/tmp/bundle/whl/*.whl")):
    name = os.path.basename(w).split("-")[0]
    try:
        md.version(name.replace("_", "-"))
    except md.PackageNotFoundError:
        todo.append(w)
print("installing", len(todo), "wheels into /tmp/site", flush=True)
sys.exit(subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                         "--no-cache-dir", "--upgrade", "--target", "/tmp/site", *todo]).returncode)
PY
# ray's raylet / gcs_server lost their exec bit nowhere (tar keeps modes), but make sure:
chmod +x /tmp/site/ray/core/src/ray/raylet/raylet /tmp/site/ray/core/src/ray/gcs/gcs_server 2>/dev/null || true
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/site/bin:$PATH
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Later shells on the same machine: `. /tmp/env.sh` instead of reinstalling.
cat > /tmp/env.sh <<'ENV'
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ENV
python3 -c "import torch, vllm, vllm_omni, diffusers; print('device env: torch', torch.__version__, '| vllm', vllm.__version__, '| vllm-omni', vllm_omni.__version__, '| diffusers', diffusers.__version__, '|', torch.cuda.get_device_name(0))" 2>&1 | grep "device env" || return 1
