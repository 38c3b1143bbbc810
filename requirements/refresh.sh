#!/usr/bin/env bash
# Re-resolves every lock in requirements/ from pyproject.toml at the newest versions it allows, then
# installs the test set into a fresh venv and runs the suite there. `--resolve-only` stops after the
# locks. Needs PyPI; uv comes from PATH or is installed into a temporary venv.
#
# The test set on the first Python below is resolved freely; every other lock is held to its
# versions, so that all of them name the one set the suite ran with (newer releases of some
# packages, jax among them, need a newer Python and would otherwise give 3.12+ an untested set).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHONS=(3.11 3.12 3.13)
PLATFORM=x86_64-manylinux_2_28  # Linux x86_64, glibc >= 2.28
AOT_PLATFORM=x86_64-manylinux_2_31  # libtpu's wheels need glibc >= 2.31
TEST_EXTRAS=(--extra test --extra judge --extra facenet --extra sface)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
uv=$(command -v uv || true)
if [[ -z $uv ]]; then
  python3 -m venv "$tmp/uv" && "$tmp/uv/bin/pip" install -q uv && uv=$tmp/uv/bin/uv
fi
compile() { "$uv" pip compile -q --upgrade --generate-hashes --custom-compile-command requirements/refresh.sh "$@"; }
tag() { echo "py${1/./}"; }

first=${PYTHONS[0]}
compile pyproject.toml requirements/test.in "${TEST_EXTRAS[@]}" \
  --python-version "$first" --python-platform $PLATFORM -o "requirements/test-$(tag "$first").txt"
tested=requirements/test-$(tag "$first").txt
for py in "${PYTHONS[@]}"; do
  compile pyproject.toml -c "$tested" \
    --python-version "$py" --python-platform $PLATFORM -o "requirements/main-$(tag "$py").txt"
  if [[ $py != "$first" ]]; then
    compile pyproject.toml requirements/test.in "${TEST_EXTRAS[@]}" -c "$tested" \
      --python-version "$py" --python-platform $PLATFORM -o "requirements/test-$(tag "$py").txt"
  fi
done
compile requirements/extras-nodeps.in --no-deps --python-version "$first" --python-platform $PLATFORM \
  -o requirements/extras-nodeps.txt

# The ahead-of-time compilers: the libtpu and CUDA PJRT plugin that the locked jax asks for.
jax=$(grep -oP '^jax==\K[^ ]+' "$tested")
printf 'jax[tpu,cuda12]==%s\n' "$jax" \
  | "$uv" pip compile -q - --no-header --no-annotate --python-version "$first" --python-platform $AOT_PLATFORM \
  | grep -E '^(libtpu|jax-cuda12-pjrt)==' > "$tmp/aot.txt"
compile "$tmp/aot.txt" --no-deps --no-annotate --python-version "$first" --python-platform $AOT_PLATFORM \
  -o requirements/aot.txt
for pin in $(cat "$tmp/aot.txt"); do
  grep -q "\"$pin\"" pyproject.toml || echo "refresh.sh: pyproject.toml's aot-tpu/aot-gpu extras should now pin $pin (jax $jax)"
done
echo "refresh.sh: locks written for Python ${PYTHONS[*]} (jax $jax); review with git diff requirements/"
[[ ${1:-} == --resolve-only ]] && exit 0

python$first -m venv "$tmp/venv"
"$tmp/venv/bin/python" requirements/install.py test
. "$tmp/venv/bin/activate"
IPSR_LOCKED_INSTALL=1 python -m pytest -q tests
