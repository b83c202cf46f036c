#!/usr/bin/env bash
# One call on a lent GPU for issue #23 (about 8 minutes on an H100): install from the working tree, the CUDA
# tests (kernels against the reference, no host sync in warm calls), then the models table of docs/benchmarks.md,
# eager and compiled. Logs and CSVs go under $OUT; each step has its own time limit, so one slow step leaves the
# others their time. Run it from the repository root:
#   device run: bash tools/gpu_session.sh
# Try it on a CPU first (every step at toy sizes, nothing compiled): DEVICE=cpu bash tools/gpu_session.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-build/gpu-session}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then
	BATCH=256 RUN_TIME=0.5 DTYPE=float16 COMPILE="reduce-overhead"
	MODELS="nat_tiny dinat_tiny biformer_tiny transnext_micro"
	PEERS="--compare swin_tiny_patch4_window7_224 --compare convnext_tiny"
	# the device image has torch, triton, timm, lightning, onnxruntime: the package itself installs without deps
	$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
	nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/machine.txt"
else
	BATCH=2 RUN_TIME=0.01 DTYPE=float32 COMPILE="" MODELS="nat_tiny" PEERS="--compare swin_tiny_patch4_window7_224"
	PY=${VENV_PY:-.venv/bin/python}
fi
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, report its status
	local name=$1 seconds=$2
	shift 2
	echo "== $name (limit ${seconds}s): $*"
	timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
	local status=$?
	echo "== $name: exit $status after ${SECONDS}s in all"
	tail -n "$([ $status -eq 0 ] && echo 1 || echo 12)" "$OUT/$name.log"
}

# 1. CUDA tests: the Triton kernels' own tests, every op backend against the reference on the GPU (parity suite),
#    and the host-sync checks of every op backend and every family (forward and training step).
step kernel-tests 150 $PY -m pytest -q -p no:cacheprovider -m "not slow" tests/test_triton_neighborhood.py \
	tests/test_triton_routing.py tests/test_triton_aggregated.py
step cuda-tests 150 $PY -m pytest -q -p no:cacheprovider -m "not slow" tests/test_backend_parity.py \
	tests/test_traceable.py -k "cuda or warm"

# 2. The models eagerly, AMP (fp16 autocast; fp32 on a CPU), channels-last, ours against the timm peers in one process.
step eager 150 $PY -m visionzoo.cli bench $MODELS $PEERS --device "$DEVICE" --dtype "$DTYPE" --channels-last \
	--batch "$BATCH" --min-run-time "$RUN_TIME" --csv "$OUT/eager.csv"

# 3. Compiled (CUDA graphs): each model compiles three times (batch 1, batch, training step), so two models and
#    Swin, the goal's peer, fit the call; the rest wait for the next lent GPU.
if [ -n "$COMPILE" ]; then
	step compiled 240 $PY -m visionzoo.cli bench nat_tiny biformer_tiny --compare swin_tiny_patch4_window7_224 \
		--device "$DEVICE" --dtype "$DTYPE" --channels-last --batch "$BATCH" --min-run-time "$RUN_TIME" \
		--compile "$COMPILE" --csv "$OUT/compiled.csv"
fi
cat "$OUT/eager.log" "$OUT/compiled.log" 2>/dev/null | grep '^|'
