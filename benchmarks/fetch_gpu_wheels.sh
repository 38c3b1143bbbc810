#!/usr/bin/env bash
# Fills .whl/ (ignored by git) with what benchmarks/gpu_check.sh needs on the GPU machine and that
# its image lacks (/work/.library/device/README.md, KINDS.md): Python 3.12, x86_64, no network.
#
#   grain, array-record, portpicker    ipsr_jax.training.train imports the Grain pipeline and checkpointing
#   ml-collections, clu                configs, config_flags, clu.metrics / periodic_actions
#   facenet-pytorch                    the PyTorch peer's InceptionResnetV1 (installed --no-deps; the
#                                      peer loads its module without the package __init__)
# plus a copy of the PyTorch peer, .whl/torch_peer.py: the device tool carries the repository
# only, not ../shared beside it. Everything else (jax, flax, optax, orbax, etils, absl, numpy,
# pyyaml, psutil, torch) is in the image. About 7 MB.
#
#   bash benchmarks/fetch_gpu_wheels.sh [PEER_SRC]     # default ../shared/bench/torch_peer.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PEER_SRC=${1:-../shared/bench/torch_peer.py}

WHEELS=(grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0 clu==0.0.12
        facenet-pytorch==2.6.0)
# pip matches manylinux tags exactly: list every one the wheels above may carry.
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$tag")
done

grep -qxF '.whl/' .gitignore 2>/dev/null || echo "note: .whl/ is not in .gitignore; keep it out of commits"
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"

# One version per package: two wheels of one name stop the install on the device.
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [[ -n "$dupes" ]]; then
  echo "error: several versions in .whl/ of: $dupes (delete the ones not pinned above)" >&2
  exit 1
fi

if [[ -f "$PEER_SRC" ]]; then
  install -m 0644 "$PEER_SRC" .whl/torch_peer.py
else
  echo "warning: $PEER_SRC not found: gpu_check.sh will skip the peer" >&2
fi
ls -l .whl
du -sh .whl
