# Two commands on a fresh machine: `make demo` and `make test`. Both create the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHARED ?= ../shared/data
DEMO_VIDEO ?= $(SHARED)/videos/short_hamilton_clip.mp4
# piqe is the one pyiqa IQA metric that builds without downloading weights (the build machines are offline);
# real users get DBCNN, the default, downloaded on first use.
# The default face detector (SCRFD) is a download too; the shared copy stands in for it.
DEMO_ARGS ?= --topk 5 --iqa piqe --fr-model $(SHARED)/models/mobilefacenet_paddlex_128d.onnx \
	--detector $(SHARED)/models/optional/scrfd_2.5g_bnkps_640.onnx --out cafi_out/demo --overwrite

.PHONY: install demo test eval
install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,ray,mediapipe,serve]'
	@# pyiqa, facexlib and mediapipe each install a cv2 build into the same folder: the headless one must win.
	$(PY) -m pip install -q --no-deps --force-reinstall -c constraints.txt opencv-python-headless
	$(PY) -c "import cv2, mediapipe, av, onnxruntime, pyiqa, supervision, datasets, pyarrow, ray, selenium, aiohttp, prometheus_client, paho.mqtt; print('cv2', cv2.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cafi-stream $(DEMO_VIDEO) $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

# Regenerates docs/results/ and the README's "Results" tables (about 30 minutes on 2 cores).
eval: $(STAMP)
	$(PY) scripts/eval_selection.py --out docs/results --readme README.md
	$(PY) scripts/eval_fiqa.py --out docs/results --readme README.md
	$(PY) scripts/eval_real.py --out docs/results --readme README.md
	$(PY) scripts/eval_cuts.py --out docs/results/cuts.json
	$(PY) scripts/eval_detectors.py --out docs/results/detectors.json --readme README.md
	$(PY) scripts/eval_detect_scale.py --out docs/results/detect_scale.json --readme README.md
	rm -rf docs/results/runs docs/results/eval_video.mp4 docs/results/ground_truth.json
