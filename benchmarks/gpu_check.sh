#!/usr/bin/env bash
# The one prepared device check: the JAX training step against the PyTorch peer, on the same card.
#
# Prepare on the workstation (once; needs the package index and ../shared/bench/torch_peer.py):
#   bash benchmarks/fetch_gpu_wheels.sh        # .whl/: grain, clu, ml-collections, ... + torch_peer.py
# Run with the device tool, in the repository root:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# Stages, in priority order, each under `timeout` and inside one overall budget (a stage that
# would start with under 30 s left is skipped; every stage saves what it has as it goes):
#   env       GPU, driver and package versions                     -> $OUT/env.txt
#   jax_bf16  benchmarks/train_step.py, bf16, $BATCHES, + a timed bf16 matmul (measured peak)
#             + a profile of 5 steps (top kernels, conv/GEMM share) -> $OUT/jax_bf16.json
#   peer      torch_peer.py --modes $PEER_MODES at $BATCHES         -> $OUT/peer.jsonl
#   jax_fp32  benchmarks/train_step.py, fp32                        -> $OUT/jax_fp32.json
#   evaluate  benchmarks/evaluate.py: Inception-ResNet-v1 faces/s and the LFW-sized protocol with
#             the UNet as SR (bf16, no PSNR/SSIM)                   -> $OUT/evaluate.json
#   report    the table (img/s, ms/step, TFLOP/s, MFU, GFLOP/img, memory, peer, ratio)
#                                                                  -> $OUT/summary.json
# Everything printed also goes to $OUT/log.txt. Knobs (environment): STAGES, BUDGET (s, whole
# script), BATCHES, STEPS, WARMUP, JAX_ARGS (extra train_step.py flags, e.g. --config=...:tiny),
# PEER (path), PEER_MODES, PEER_STEPS, PEER_WARMUP, EVAL_ARGS, PROFILE (1, the default: trace 5
# bf16 steps, print the top kernels, traces -> $OUT/profile.tgz; 0: no trace), PYTHON,
# PEER_PYTHON (default PYTHON), SITE (wheel target, /tmp/site).
# CPU dry run (no GPU, tiny sizes):
#   JAX_PLATFORMS=cpu OUT=/tmp/gpu_dry BATCHES=2 STEPS=2 WARMUP=1 PEER_MODES=fp32 PEER_STEPS=1 \
#   PEER_WARMUP=0 JAX_ARGS="--config=configs/base.py:tiny" EVAL_ARGS="--num_images=400 --trials=2 \
#   --embedder=tiny --sr=copy" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
PEER_PY=${PEER_PYTHON:-$PY}
SITE=${SITE:-/tmp/site}
STAGES=${STAGES:-env jax_bf16 peer jax_fp32 evaluate report}
BUDGET=${BUDGET:-570}
BATCHES=${BATCHES:-64,256}
STEPS=${STEPS:-50}
WARMUP=${WARMUP:-5}
JAX_ARGS=${JAX_ARGS:-}
PEER=${PEER:-.whl/torch_peer.py}
PEER_MODES=${PEER_MODES:-bf16_cl_compile_ro}
PEER_STEPS=${PEER_STEPS:-20}
PEER_WARMUP=${PEER_WARMUP:-5}
EVAL_ARGS=${EVAL_ARGS:---embedder=facenet --precision=bf16 --sr=unet --no_quality}
PROFILE=${PROFILE:-1}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# JAX takes 75% of the GPU by default; fp32 at batch 256 may want more. The peer runs in its own
# process after JAX has exited, so JAX can have nearly all of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
LOG="$OUT/log.txt"
: >"$LOG"
start=$SECONDS

log() { echo "[gpu_check +$((SECONDS - start))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - (SECONDS - start))); }
wants() { [[ " $STAGES " == *" $1 "* ]]; }

# run_stage NAME MAX_SECONDS CMD...: runs CMD under timeout (at most MAX_SECONDS, at most what
# the budget has left), output to the console and the log.
run_stage() {
  local name=$1 max=$2 limit
  shift 2
  limit=$(left)
  ((limit > max)) && limit=$max
  if ((limit < 30)); then
    log "skip $name: $(left)s of the budget left"
    return 0
  fi
  log "stage $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | grep --line-buffered -v -E \
    'Some donated buffers were not usable|warnings.warn\(' | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  ((rc == 124 || rc == 137)) && log "stage $name: stopped at its ${limit}s limit (partial results kept)"
  ((rc != 0 && rc != 124 && rc != 137)) && log "stage $name: exit status $rc"
  return 0
}

if compgen -G ".whl/*.whl" >/dev/null; then
  log "installing carried wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl 2>&1 | tail -3 | tee -a "$LOG"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
else
  log "no .whl/*.whl here (run benchmarks/fetch_gpu_wheels.sh first when grain/clu are missing)"
fi

if wants env; then
  {
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null ||
      echo "nvidia-smi: not available"
    "$PY" - <<'EOF'
import importlib, importlib.util, platform
print('python', platform.python_version())
for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'grain', 'clu.metrics',
             'ml_collections', 'numpy', 'torch'):
  try:
    m = importlib.import_module(name)
    print(f'{name:18s}', getattr(m, '__version__', 'ok'))
  except Exception as e:  # report, do not stop: the stages say what they need
    print(f'{name:18s} MISSING ({type(e).__name__}: {e})')
# The peer loads facenet_pytorch's model file without its package __init__: presence is enough.
print(f"{'facenet_pytorch':18s}", 'ok' if importlib.util.find_spec('facenet_pytorch') else 'MISSING')
import jax
print('jax devices', jax.devices())
EOF
  } 2>&1 | tee "$OUT/env.txt" | tee -a "$LOG"
fi

PROFILE_ARGS=()
((PROFILE)) && PROFILE_ARGS=(--profile_dir=/tmp/gpu_check_profile)

if wants jax_bf16; then
  # shellcheck disable=SC2086  # JAX_ARGS is a list of flags
  run_stage jax_bf16 260 "$PY" benchmarks/train_step.py --precisions=bf16 --batch_sizes="$BATCHES" \
    --steps="$STEPS" --warmup="$WARMUP" --measure_peak "${PROFILE_ARGS[@]}" $JAX_ARGS \
    --out="$OUT/jax_bf16.json"
fi

if wants peer; then
  if [[ -f "$PEER" ]]; then
    before=$(wc -l <"$LOG")
    # shellcheck disable=SC2046,SC2086
    run_stage peer 300 "$PEER_PY" -u "$PEER" --batch $(tr ',' ' ' <<<"$BATCHES") --modes $PEER_MODES \
      --steps "$PEER_STEPS" --warmup "$PEER_WARMUP"
    tail -n +"$((before + 1))" "$LOG" | grep -E '^\{' >"$OUT/peer.jsonl" || true
  else
    log "skip peer: $PEER not found (benchmarks/fetch_gpu_wheels.sh copies it into .whl/)"
  fi
fi

if wants jax_fp32; then
  # shellcheck disable=SC2086
  run_stage jax_fp32 200 "$PY" benchmarks/train_step.py --precisions=fp32 --batch_sizes="$BATCHES" \
    --steps="$STEPS" --warmup="$WARMUP" $JAX_ARGS --out="$OUT/jax_fp32.json"
fi

if wants evaluate; then
  # shellcheck disable=SC2086
  run_stage evaluate 150 "$PY" benchmarks/evaluate.py $EVAL_ARGS --out="$OUT/evaluate.json"
fi

if ((PROFILE)) && [[ -d /tmp/gpu_check_profile ]]; then
  # The Chrome traces only (Perfetto / chrome://tracing open them); files back are <= 16 MiB.
  (cd /tmp && find gpu_check_profile -name '*.trace.json.gz' -print0 |
    tar -czf "$OUT/profile.tgz" --null -T -)
  if (($(stat -c %s "$OUT/profile.tgz") > 15000000)); then
    rm -f "$OUT/profile.tgz"
    log "profile traces over 15 MB: not returned (top kernels are in jax_bf16.json)"
  else
    log "profile traces -> $OUT/profile.tgz"
  fi
fi

if wants report; then
  log "report"
  "$PY" benchmarks/train_step.py \
    --report="$OUT/jax_bf16.json,$OUT/peer.jsonl,$OUT/jax_fp32.json" --out="$OUT/summary.json" 2>&1 |
    grep -v -E 'missing, skipped' | tee -a "$LOG"
  if [[ -f "$OUT/evaluate.json" ]]; then
    "$PY" - "$OUT/evaluate.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
r = json.load(open(sys.argv[1]))
e, p = r.get('embed'), r.get('protocol')
if e:
  print(f"evaluate: {r['embedder']['kind']} {r['embedder']['precision']}: {e['faces_per_s']:.0f} faces/s")
if p:
  print(f"evaluate: LFW-sized protocol {p['wall_s']:.1f}s wall ({p['images_used']} images used, "
        f"{p['trials']} trials x {len(p['conditions'])} resolutions, sr={p['sr']}): embed "
        f"{p['embed_s']:.1f}s, sr {p['sr_s']:.1f}s, load {p['load_s']:.1f}s, other {p['other_s']:.1f}s")
EOF
  fi
fi
log "done in $((SECONDS - start))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
