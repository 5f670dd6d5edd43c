# Helpers for .ci/run and the optional job scripts beside it (.ci/browser-deps.sh, .ci/vllm.sh).
# Source it from the repository root:  . .ci/lib.sh
# Venvs live in .ci-venvs/ (git-ignored) and are made afresh by every job that uses one.

CI_ROOT=${CI_ROOT:-$(pwd)}
CI_VENVS=${CI_VENVS:-$CI_ROOT/.ci-venvs}
CI_PYTHON=${CI_PYTHON:-python3}
export CI_ROOT CI_VENVS CI_PYTHON
# The test suite never reaches a model hub (tests build tiny models or read ../shared).
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Readable CI logs: no progress bars from pip.
export PIP_PROGRESS_BAR=off

# ci_fresh_venv NAME: delete and recreate $CI_VENVS/NAME, then activate it.
ci_fresh_venv() {
  local dir=$CI_VENVS/$1
  rm -rf "$dir"
  mkdir -p "$CI_VENVS"
  "$CI_PYTHON" -m venv "$dir"
  # shellcheck disable=SC1091
  . "$dir/bin/activate"
  echo "venv: $dir ($(python --version 2>&1))"
}

# ci_check_rc RC: a test command's exit status; 5 is pytest's "no tests collected", a failure here.
ci_check_rc() {
  if [ "$1" -eq 5 ]; then
    echo "error: pytest collected no tests (exit 5)" >&2
    return 1
  fi
  return "$1"
}

# ci_pytest ARGS...: python -m pytest ARGS in the active venv; no tests collected is a failure.
ci_pytest() {
  local rc=0
  python -m pytest "$@" || rc=$?
  ci_check_rc "$rc"
}

# ci_versions: one line with the versions that matter, from the active venv.
ci_versions() {
  python - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
names = ["torch", "transformers", "diffusers", "tokenizers", "huggingface-hub", "safetensors",
         "numpy", "scikit-learn", "alt-profanity-check", "pytest"]
found = []
for n in names:
    try:
        found.append(f"{n} {version(n)}")
    except PackageNotFoundError:
        pass
print("versions: " + ", ".join(found))
EOF
}
