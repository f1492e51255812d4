#!/usr/bin/env bash
# Every GPU measurement of the project in one prepared run (under 10 minutes on one H100/H200):
#   1. ctfm_pretrain: views/s end to end (data included) at the recipe's sizes, the plain MONAI
#      CPU pipeline first, then fp32 / bf16 + channels_last_3d / + torch.compile (the first H200
#      run spent over 2 minutes compiling, so compile goes last);
#   2. ctfm_wholebody_seg: seconds per 512 x 512 x 300 CT end to end, plain MONAI at the
#      reference settings vs the bundle (same settings, then sw_batch 8 at overlap 0.25, fast);
#   3. ctfm_retrieval: embedding patches/s, bundle (bf16) vs a plain MONAI loop (fp32);
#   4. the main job (ctfm-demo) on CUDA: every bundle's bf16 path runs.
# Results go to $OUT (default outputs/gpu_checks): one JSON per benchmark, logs, all.log.
# Record the figures with the card's name in docs/BENCHMARKS.md.
#
# Usage (repo root): bash tools/bench/gpu_checks.sh [quick]
#   quick: tiny sizes, to check the script itself on a CPU.
# Where MONAI and friends are not installed (a bare GPU machine), put their wheels in .whl/.
set -uo pipefail
OUT="${OUT:-outputs/gpu_checks}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if [ -d .whl ] && ! "$PY" -c "import monai" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# the tools are the package ctfm_bundles.tools (pyproject.toml): install this checkout editable, without dependencies
"$PY" -c "import ctfm_bundles.tools" 2>/dev/null || "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
exec > >(tee -a "$OUT/all.log") 2>&1

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ "${1:-}" = quick ]; then
  pre=(--init_filters 8 --patch_size 16,64,64 --num_crops 4 --batch_size 2 --iterations 2 --num_workers 2
       --num_phantoms 2 --phantom_shape 96,96,64 --phantom_spacing 2.0 --variants fp32,cl)
  seg_shape=96,96,64 seg_spacing=2,2,3 seg_net=(--init_filters 8 --num_classes 8 --roi_size 32,64,64)
  emb=(--num_scans 3 --shape 96,96,64 --init_filters 8 --num_workers 2)
  demo_filters=8
else
  pre=(--init_filters 32 --patch_size 32,128,128 --num_crops 15 --batch_size 4 --iterations 8 --num_workers 14
       --num_phantoms 8 --phantom_shape 320,320,200 --phantom_spacing 1.0 --variants fp32,bf16+cl,bf16+cl+compile)
  seg_shape=512,512,300 seg_spacing=0.8,0.8,1.5 seg_net=()
  emb=(--num_scans 6 --shape 384,384,200 --spacing 0.9,0.9,1.5 --batch_size 16 --num_workers 8)
  demo_filters=16
fi

step() {  # step NAME SECONDS command...: run with a time limit, report rc and wall time
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc, $((SECONDS - start)) s"
  tail -n 25 "$work/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || true
  "$PY" -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__,
  'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'); import os; print('cpus', os.cpu_count())"
} | tee "$OUT/env.txt"

step pretrain 200 "$PY" -m ctfm_bundles.tools.bench.pretrain "${pre[@]}" --output "$OUT/pretrain.json"

"$PY" -c "from ctfm_bundles.tools.synthetic import phantom
ct, labels, affine = phantom.make_body_phantom(shape=($seg_shape), spacing=($seg_spacing), seed=0)
phantom.save_phantom(ct, labels, affine, image_path='$work/ct.nii.gz', label_path='$work/ct_labels.nii.gz')"
step seg_reference 110 "$PY" -m ctfm_bundles.tools.bench.wholebody_seg bench --image "$work/ct.nii.gz" "${seg_net[@]}" \
  --pipelines plain,bundle --sw_batch_size 2 --overlap 0.625 --repeats 2 --threads 8 --output "$OUT/seg_reference.json"
step seg_sw8_overlap025 80 "$PY" -m ctfm_bundles.tools.bench.wholebody_seg bench --image "$work/ct.nii.gz" "${seg_net[@]}" \
  --pipelines bundle,fast --sw_batch_size 8 --overlap 0.25 --repeats 2 --threads 8 --output "$OUT/seg_sw8_overlap025.json"

step embed 60 "$PY" -m ctfm_bundles.tools.bench.embed "${emb[@]}" --output "$OUT/embed.json"

step demo 110 "$PY" -m ctfm_bundles.tools.demo --output_dir "$work/demo" --init_filters "$demo_filters"
echo "=== done"
