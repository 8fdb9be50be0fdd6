#!/usr/bin/env bash
# Builds the GPU-machine bundle for verl_omni: a slimmed vllm 0.24.0, vllm-omni 0.24.0, diffusers 0.38.0,
# the wheels the GPU image lacks, and (unless --lean) verl 0.9.1 + a slimmed Ray 2.60 so that `import verl_omni`
# works there. Everything is packed and split into chunks of DEVICE_CHUNK_MB (60) MiB for size-limited transfers.
# Run from the project root:  bash scripts/device/build_bundle.sh [--lean]
#   --lean  only the engine stack (wheels.txt); `import verl_omni` then fails on the device (it imports verl).
# Output: .device/c1 .. .device/cN (git-ignored). How to use them: README.md beside this file.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(git -C "$here" rev-parse --show-toplevel)
out="$root/.device"
cache="${DEVICE_WHEEL_CACHE:-$HOME/.cache/device-wheels}"
chunk_mb="${DEVICE_CHUNK_MB:-60}"
lean=0; [ "${1:-}" = "--lean" ] && lean=1
lists=("$here/wheels.txt"); [ $lean = 0 ] && lists+=("$here/wheels-e2e.txt")
mkdir -p "$cache/whl"
grep -qx '/.device/' "$root/.git/info/exclude" 2>/dev/null || echo '/.device/' >> "$root/.git/info/exclude"

plat=(--only-binary=:all: --python-version 3.12 --implementation cp)
for p in 2_28 2_27 2_24 2_17 2_31 2_34 2_35 2_5; do plat+=(--platform "manylinux_${p}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# A line ending in '# sdist' names a pure-Python package published without a wheel: built here with pip wheel.
reqs=$(grep -hvE '^\s*(#|$)' "${lists[@]}" | sed -E 's/\s*#.*$//')
sdist=$(grep -hE '#\s*sdist' "${lists[@]}" | sed -E 's/\s*#.*$//' || true)
binary=$(echo "$reqs" | grep -vxF -f <(echo "${sdist:-__none__}") || true)
echo "downloading wheels into $cache (cached between runs)"
python3 -m pip download -q --no-deps "${plat[@]}" -d "$cache/whl" $binary 2>&1 | grep -v "is ignored: it is neither" || true
for r in $sdist; do python3 -m pip wheel -q --no-deps -w "$cache/whl" "$r" 2>&1 | grep -v "is ignored: it is neither" || true; done
python3 -m pip download -q --no-deps "${plat[@]}" -d "$cache" vllm==0.24.0 2>&1 | grep -v "is ignored: it is neither" || true

bundle=$(mktemp -d); stage=$(mktemp -d); trap 'rm -rf "$bundle" "$stage"' EXIT
if [ ! -f "$cache/vllm_py.tar.xz" ] || [ ! -f "$cache/C.so.xz" ] || [ ! -f "$cache/fa3.so.xz" ]; then
  echo "slimming vllm (python files + the two kernel libraries the diffusion path loads)"
  unzip -q "$cache"/vllm-0.24.0-*.whl -d "$stage"
  tar -C "$stage" -cJf "$cache/vllm_py.tar.xz" \
    --exclude='vllm/third_party/deep_gemm' --exclude='vllm/third_party/fmha_sm100' \
    --exclude='vllm/_C_stable_libtorch.abi3.so' --exclude='vllm/_moe_C_stable_libtorch.abi3.so' \
    --exclude='vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so' --exclude='vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so' \
    --exclude='vllm/vllm-rs' --exclude='*.js' \
    vllm vllm-0.24.0.dist-info
  xz -T0 -6 -c "$stage/vllm/_C_stable_libtorch.abi3.so" > "$cache/C.so.xz"
  xz -T0 -6 -c "$stage/vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so" > "$cache/fa3.so.xz"
  rm -rf "${stage:?}"/*
fi
cp "$cache/vllm_py.tar.xz" "$cache/C.so.xz" "$cache/fa3.so.xz" "$bundle/"
if [ $lean = 0 ]; then
  if [ ! -f "$cache/ray_slim.tar.xz" ]; then
    echo "slimming ray 2.60.0 (drops the Java jars and the dashboard's web build: 79 MB wheel -> ~30 MB xz)"
    python3 -m pip download -q --no-deps "${plat[@]}" -d "$cache" ray==2.60.0 2>&1 | grep -v "is ignored" || true
    mkdir -p "$stage/ray" && unzip -q "$cache"/ray-2.60.0-*.whl -d "$stage/ray"
    rm -rf "$stage/ray/ray/jars" "$stage/ray/ray/dashboard/client/build"
    find "$stage/ray" -name '*.js.map' -delete
    tar -C "$stage/ray" -cf - . | xz -T0 -6 > "$cache/ray_slim.tar.xz"
  fi
  cp "$cache/ray_slim.tar.xz" "$bundle/"
fi
mkdir "$bundle/whl"
for r in $reqs; do
  n=$(echo "$r" | sed -E 's/[<>=!~].*//; s/[-.]/_/g' | tr 'A-Z' 'a-z')
  v=$(echo "$r" | sed -nE 's/.*==(.*)/\1/p')
  f=$(ls "$cache/whl" | awk -v n="$n" -v v="$v" 'BEGIN{IGNORECASE=1} { m=$0; sub(/-.*/,"",m); gsub(/[-.]/,"_",m); split($0, parts, "-"); if (tolower(m)==n && (v=="" || parts[2]==v)) print }' | sort -V | tail -1)
  [ -n "$f" ] || { echo "no wheel found for $r"; exit 1; }
  cp "$cache/whl/$f" "$bundle/whl/"
done

rm -rf "$out"; mkdir -p "$out"
tar -C "$bundle" -cf - . | split -b "${chunk_mb}M" -d -a 2 - "$out/part_"
i=0; for p in "$out"/part_*; do i=$((i+1)); mkdir -p "$out/c$i"; mv "$p" "$out/c$i/"; done
cp "$here/install.sh" "$out/c$i/"
echo "bundle: $(du -sh "$out" | cut -f1) in $i chunks"
echo "on the GPU machine, from the repository root: copy every .device/cK/part_* into /tmp/chunks, then"
echo "  . scripts/device/install.sh && bash scripts/device/run_gpu.sh tests   (see scripts/device/README.md)"
