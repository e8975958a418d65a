#!/usr/bin/env bash
# The whole pipeline on an NVIDIA machine that has torch but no network; without a GPU, the same runs on CPU (the
# smoke test CI runs).
#
#   scripts/bench_gpu.sh prepare
#       Here, where pip reaches its registry: the wheels such a machine lacks (av, supervision's ByteTrack,
#       onnx2torch, pyiqa for DBCNN's architecture; no mediapipe) for CPython 3.12 on x86-64, and the ONNX models,
#       into $CAFI_GPU_DIR (default .gpu/, ignored by git, under 64 MiB): carry that folder to the machine.
#   scripts/bench_gpu.sh run [VIDEO] [bench.py options ...]
#       There: install the carried wheels into a private folder when the packages are missing, then
#       scripts/bench.py on VIDEO (default: the shared Hamilton clip) re-encoded at 1080p, three times:
#         1. `--iqa none` with MobileFaceNet: the front end (decode, detection, tracking, SER-FIQ);
#         2. the default configuration's cost: ArcFace R50's topology and DBCNN, randomly initialised;
#         3. the front end with `--exhaustive`: every frame detected, detect.batch frames a detector call.
#       On cuda when torch sees a GPU (backend auto: TensorRT when installed, else ONNX Runtime's CUDA provider,
#       else torch CUDA), else on CPU. One JSON object per run on stdout, with the card's name.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GPU_DIR="${CAFI_GPU_DIR:-$ROOT/.gpu}"
PY="${PYTHON:-python3}"
SHARED="${CAFI_SHARED_DATA:-$ROOT/../shared/data}"
WHEELS=(av==18.1.0 supervision==0.30.9 defusedxml==0.7.1 pyDeprecate==0.13.0 onnx2torch==1.5.15 pyiqa==0.1.16)
MODELS=("$SHARED/models/optional/scrfd_2.5g_bnkps_640.onnx" "$SHARED/models/mobilefacenet_paddlex_128d.onnx"
        "$SHARED/videos/short_hamilton_clip.mp4")

first_file() {   # the first of its arguments that is a file
    for f in "$@"; do [ -f "$f" ] && { echo "$f"; return; }; done
    echo "none of: $*" >&2
    return 1
}

case "${1:-}" in
prepare)
    mkdir -p "$GPU_DIR/wheels" "$GPU_DIR/models"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$GPU_DIR/wheels" "${WHEELS[@]}"
    cp "${MODELS[@]}" "$GPU_DIR/models/"
    du -sh "$GPU_DIR"
    ;;
run)
    shift
    if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
        video="$(realpath "$1")"
        shift
    else
        video="$(first_file "$GPU_DIR/models/short_hamilton_clip.mp4" "$SHARED/videos/short_hamilton_clip.mp4")"
    fi
    if ! "$PY" -c "import av, supervision, onnx2torch, pyiqa" 2>/dev/null; then
        site="${TMPDIR:-/tmp}/cafi-gpu-site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$GPU_DIR"/wheels/*.whl
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export CAFI_MODEL_PATH="$GPU_DIR/models:$SHARED/models/optional:$SHARED/models"
    fr="$(first_file "$GPU_DIR/models/mobilefacenet_paddlex_128d.onnx" "$SHARED/models/mobilefacenet_paddlex_128d.onnx")"
    device="$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")"
    cd "$ROOT"
    "$PY" scripts/bench.py "$video" --upscale 1080 --device "$device" --iqa none --fr-model "$fr" --compact "$@"
    "$PY" scripts/bench.py "$video" --upscale 1080 --device "$device" --random-r50 --random-dbcnn --compact "$@"
    "$PY" scripts/bench.py "$video" --upscale 1080 --device "$device" --iqa none --fr-model "$fr" --exhaustive \
        --compact "$@"
    ;;
*)
    sed -n '2,16p' "$0" >&2
    exit 2
    ;;
esac
