#!/usr/bin/env bash
# The core package without mediapipe, on numpy 2: install it into a fresh virtual environment and run the main
# command on the shared clip with the ONNX detectors. CI runs this after the tests.
#   scripts/check_core.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-core}
SHARED=${CAFI_SHARED_DATA:-../shared/data}
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c constraints.txt .
"$VENV/bin/python" - <<'PY'
import importlib.util, numpy
assert int(numpy.__version__.split(".")[0]) >= 2, f"numpy {numpy.__version__}: the core should resolve to numpy 2"
assert importlib.util.find_spec("mediapipe") is None, "mediapipe is an extra, not a core dependency"
print("core environment: numpy", numpy.__version__, "without mediapipe")
PY
export CAFI_MODEL_PATH="$SHARED/models/optional"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for detector in scrfd_2.5g yunet; do
  "$VENV/bin/cafi-stream" "$SHARED/videos/short_hamilton_clip.mp4" --topk 3 --iqa piqe --detector "$detector" \
    --fr-model "$SHARED/models/mobilefacenet_paddlex_128d.onnx" --out "$out/$detector" --quiet
  rows=$(wc -l < "$out/$detector/metadata.jsonl")
  [ "$rows" -ge 3 ] || { echo "check_core: $detector kept $rows faces" >&2; exit 1; }
  precision=$("$VENV/bin/python" -c "import json, sys; print(json.load(open(sys.argv[1]))['engines']['face_detector_precision'])" "$out/$detector/summary.json")
  # The installed package carries SCRFD's fitted ranges, and this ONNX Runtime builds the 8-bit graph from them.
  [ "$detector" != scrfd_2.5g ] || [ "$precision" = int8 ] || { echo "check_core: scrfd_2.5g ran in $precision" >&2; exit 1; }
  echo "core run with $detector ($precision): $rows faces kept"
done
# Without the extra, asking for mediapipe is one clear line and exit code 2, not a traceback.
set +e
err=$("$VENV/bin/cafi-stream" "$SHARED/videos/short_hamilton_clip.mp4" --detector mediapipe --iqa none \
  --fr-model "$SHARED/models/mobilefacenet_paddlex_128d.onnx" --out "$out/mp" --quiet 2>&1)
rc=$?
set -e
[ "$rc" = 2 ] && [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] && ! grep -q Traceback <<<"$err" \
  || { echo "check_core: --detector mediapipe without the extra gave rc $rc: $err" >&2; exit 1; }
echo "without the extra: $err"
