#!/usr/bin/env bash
# The one prepared check for a lent GPU box (see benchmarks/README.md, "GPU box").
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=600)
#
# Steps, each timestamped: record the machine; unpack the carried .deb files (.gpu/debs) into
# /tmp/prefix (liburing for the io_uring engine, pkgconf if the box has no pkg-config) and find a
# usable fio (.gpu/bin/fio, a static build; else fio from .gpu/debs in its own prefix; else none:
# the harness then measures the O_DIRECT ceiling with fastckpt's engine); install carried peer
# wheels (.gpu/whl) into /tmp/site; build fastckpt; run `pytest -m gpu -x -q`; run the benchmark
# on cuda:0 with a generated LLaMA-like checkpoint (default 6GB) inside the time left; print the
# results last. Everything lands flat in $OUT (8 files with tune.log, the pipeline knob sweep): machine.txt, build.log, gpu_tests.log,
# bench.log, results.json, results.md, results.png.
#
# Dry run on a machine without a GPU (the same flow on a tiny checkpoint, on CPU):
#   FASTCKPT_GPU_CHECK_DRY=1 OUT=/tmp/out bash benchmarks/gpu_check.sh
# Knobs (environment): FASTCKPT_GPU_CHECK_SIZE (default 6GB; dry 16MB),
# FASTCKPT_GPU_CHECK_BUDGET_S (whole script, default 450), FASTCKPT_GPU_CHECK_REPEATS (default 3),
# FASTCKPT_GPU_CHECK_BUILD=1 (dry run: build too, into /tmp, leaving the checkout's build alone),
# FASTCKPT_GPU_CHECK_IGNORE_SYSTEM_FIO=1 (use the carried fio even where one is installed),
# PYTHON (default python3).
set -uo pipefail

T0=$(date +%s)
ts() { echo "[gpu_check $(date +%H:%M:%S) +$(($(date +%s) - T0))s] $*"; }
elapsed() { echo $(($(date +%s) - T0)); }

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
: "${OUT:?set OUT to the folder that comes back}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DRY=${FASTCKPT_GPU_CHECK_DRY:-0}
BUDGET_S=${FASTCKPT_GPU_CHECK_BUDGET_S:-450}
REPEATS=${FASTCKPT_GPU_CHECK_REPEATS:-3}
if [ "$DRY" = 1 ]; then
  SIZE=${FASTCKPT_GPU_CHECK_SIZE:-16MB}
  DEVICE=cpu
  REPEATS=${FASTCKPT_GPU_CHECK_REPEATS:-1}
else
  SIZE=${FASTCKPT_GPU_CHECK_SIZE:-6GB}
  DEVICE=cuda:0
fi
PREFIX=/tmp/prefix         # liburing, pkgconf: safe to put on LD_LIBRARY_PATH
PREFIX_FIO=/tmp/prefix-fio # fio and its libraries: only ever on fio's own LD_LIBRARY_PATH
MULTIARCH=x86_64-linux-gnu
BUILD_STATUS=skipped
TESTS_STATUS=skipped
BENCH_STATUS=skipped

ts "start: dry=$DRY size=$SIZE device=$DEVICE budget=${BUDGET_S}s repeats=$REPEATS"

# ---------------------------------------------------------------------------------- machine
{
  echo "== date"; date -u
  echo "== uname"; uname -a
  echo "== os-release"; cat /etc/os-release 2>/dev/null
  echo "== glibc"; ldd --version 2>&1 | head -1
  echo "== cpus"; nproc; grep -m1 'model name' /proc/cpuinfo
  echo "== memory"; free -b
  echo "== disks"; df -hT / /tmp /var/tmp /dev/shm "$ROOT" 2>/dev/null
  echo "== nvidia-smi"; nvidia-smi 2>&1 | head -20
  echo "== python"; command -v "$PY"; "$PY" --version
  echo "== packages"
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|safetensors|numpy|pybind11|scikit.build.core|cmake|ninja|pytest|hypothesis|typer|humanize|transformers|peft) ' || true
  echo "== tools"
  for t in cmake ninja pkg-config pkgconf dpkg ar fio gcc g++ c++; do
    printf '%s: %s\n' "$t" "$(command -v $t || echo missing)"
  done
} >"$OUT/machine.txt" 2>&1
ts "machine recorded in machine.txt"

# ---------------------------------------------------------------------------- .deb files
unpack_deb() { # deb, dest
  if command -v dpkg >/dev/null 2>&1; then
    dpkg -x "$1" "$2"
  else
    (cd "$2" && ar p "$1" "$(ar t "$1" | grep '^data.tar')" | tar -x)
  fi
}
rm -rf "$PREFIX" "$PREFIX_FIO"
mkdir -p "$PREFIX" "$PREFIX_FIO" "$PREFIX/bin"
shopt -s nullglob
debs=(.gpu/debs/*.deb)
fio_debs=0
for deb in "${debs[@]}"; do
  case "$(basename "$deb")" in
    liburing*|pkgconf*|libpkgconf*) unpack_deb "$ROOT/$deb" "$PREFIX" || ts "could not unpack $deb" ;;
    *) unpack_deb "$ROOT/$deb" "$PREFIX_FIO" && fio_debs=$((fio_debs + 1)) || ts "could not unpack $deb" ;;
  esac
done
ts "unpacked ${#debs[@]} .deb file(s) (${fio_debs} for fio)"
for pc in "$PREFIX"/usr/lib/$MULTIARCH/pkgconfig/*.pc "$PREFIX"/usr/share/pkgconfig/*.pc; do
  sed -i -E "s#^(prefix|exec_prefix|libdir|includedir)=/usr#\1=$PREFIX/usr#" "$pc"
done
export PKG_CONFIG_PATH="$PREFIX/usr/lib/$MULTIARCH/pkgconfig:$PREFIX/usr/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
export CMAKE_PREFIX_PATH="$PREFIX/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export CPATH="$PREFIX/usr/include${CPATH:+:$CPATH}"
export LIBRARY_PATH="$PREFIX/usr/lib/$MULTIARCH${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$PREFIX/usr/lib/$MULTIARCH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$PREFIX/bin:$PATH"
if ! command -v pkg-config >/dev/null 2>&1 && [ -x "$PREFIX/usr/bin/pkgconf" ]; then
  ln -sf "$PREFIX/usr/bin/pkgconf" "$PREFIX/bin/pkg-config"
  export PKG_CONFIG="$PREFIX/bin/pkg-config"
  ts "pkg-config: using the carried pkgconf"
fi
if pkg-config --exists liburing 2>/dev/null; then
  ts "liburing $(pkg-config --modversion liburing) found by pkg-config"
else
  ts "liburing not found by pkg-config: the engine will build without io_uring (pread pool)"
fi

# fio: the box's own, else the carried static build, else the carried .deb build
FIO_NOTE="none (the harness measures the O_DIRECT ceiling with fastckpt's engine)"
if [ "${FASTCKPT_GPU_CHECK_IGNORE_SYSTEM_FIO:-0}" != 1 ] && command -v fio >/dev/null 2>&1 \
    && fio --version >/dev/null 2>&1; then
  FIO_NOTE="system $(command -v fio)"
elif [ -f .gpu/bin/fio ]; then
  cp .gpu/bin/fio "$PREFIX/bin/fio" && chmod +x "$PREFIX/bin/fio"
  if "$PREFIX/bin/fio" --version >/dev/null 2>&1; then
    FIO_NOTE="carried static build"
  else
    rm -f "$PREFIX/bin/fio"
  fi
fi
if [ ! -x "$PREFIX/bin/fio" ] && [ -x "$PREFIX_FIO/usr/bin/fio" ]; then
  fio_libs="$PREFIX_FIO/usr/lib/$MULTIARCH:$PREFIX_FIO/lib/$MULTIARCH:$PREFIX_FIO/usr/lib/$MULTIARCH/ceph"
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$fio_libs" "$PREFIX_FIO/usr/bin/fio" >"$PREFIX/bin/fio"
  chmod +x "$PREFIX/bin/fio"
  if "$PREFIX/bin/fio" --version >/dev/null 2>&1; then
    FIO_NOTE="carried .deb build"
  else
    ts "fio from .deb files does not run here: $("$PREFIX/bin/fio" --version 2>&1 | head -1)"
    rm -f "$PREFIX/bin/fio"
  fi
fi
if command -v fio >/dev/null 2>&1; then FIO_NOTE="$FIO_NOTE: $(fio --version 2>&1)"; fi
ts "fio: $FIO_NOTE"
echo "== fio: $FIO_NOTE" >>"$OUT/machine.txt"

# ------------------------------------------------------------------------------ peer wheels
whls=(.gpu/whl/*.whl)
if [ ${#whls[@]} -gt 0 ]; then
  mkdir -p /tmp/site
  for whl in "${whls[@]}"; do
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$whl" >/dev/null 2>"$OUT/.pip.err"; then
      ts "installed $(basename "$whl")"
    else
      ts "skipped $(basename "$whl"): $(tail -1 "$OUT/.pip.err")"
    fi
  done
  rm -f "$OUT/.pip.err"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# ------------------------------------------------------------------------------------ build
build_editable() {
  timeout 300 "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
}
build_into_tmp() { # dry run: prove the build works without replacing the checkout's own build
  rm -rf /tmp/fastckpt-gpu-check-site
  timeout 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index \
    -C build-dir=/tmp/fastckpt-gpu-check-build --target /tmp/fastckpt-gpu-check-site . \
    >"$OUT/build.log" 2>&1
}
if [ "$DRY" = 1 ] && [ "${FASTCKPT_GPU_CHECK_BUILD:-0}" != 1 ]; then
  if "$PY" -c "import fastckpt._core" 2>/dev/null; then
    BUILD_STATUS="skipped (dry run; using the existing build)"
  else
    BUILD_STATUS="skipped (dry run) and fastckpt._core is missing"
  fi
  echo "$BUILD_STATUS" >"$OUT/build.log"
else
  ts "building fastckpt (log: build.log)"
  if [ "$DRY" = 1 ]; then build_into_tmp; else build_editable; fi
  rc=$?
  if [ $rc -eq 0 ]; then BUILD_STATUS=ok; else BUILD_STATUS="FAILED (exit $rc)"; tail -20 "$OUT/build.log"; fi
fi
ENGINE=$("$PY" -c "import fastckpt; print(fastckpt.engine_info())" 2>&1 | tail -1)
ts "build: $BUILD_STATUS; engine: $ENGINE"
echo "== build: $BUILD_STATUS" >>"$OUT/machine.txt"
echo "== engine: $ENGINE" >>"$OUT/machine.txt"

# ------------------------------------------------------------------------------- GPU tests
ts "pytest -m gpu -x -q (log: gpu_tests.log)"
if command -v pytest >/dev/null 2>&1 || "$PY" -c "import pytest" 2>/dev/null; then
  timeout 180 "$PY" -m pytest -m gpu -x -q -p no:cacheprovider tests >"$OUT/gpu_tests.log" 2>&1
  rc=$?
  case $rc in
    0) TESTS_STATUS=passed ;;
    5) TESTS_STATUS="no test selected" ;;
    124) TESTS_STATUS="TIMED OUT" ;;
    *) TESTS_STATUS="FAILED (exit $rc)" ;;
  esac
  tail -3 "$OUT/gpu_tests.log"
else
  TESTS_STATUS="pytest missing"
  echo "pytest is not installed" >"$OUT/gpu_tests.log"
fi
ts "gpu tests: $TESTS_STATUS"

# ------------------------------------------------------------------------------- benchmark
pick_workdir() { # a disk-backed folder (never tmpfs: cold would be meaningless) with room
  local need=$1 d fs avail
  for d in /var/tmp/fastckpt-bench "$HOME/fastckpt-bench" "$ROOT/.bench_work" /tmp/fastckpt-bench; do
    mkdir -p "$d" 2>/dev/null || continue
    fs=$(stat -f -c %T "$d" 2>/dev/null || echo unknown)
    avail=$(df -P -B1 "$d" 2>/dev/null | awk 'NR==2 {print $4}')
    case "$fs" in tmpfs|ramfs) continue ;; esac
    if [ -n "$avail" ] && [ "$avail" -gt "$need" ]; then echo "$d"; return 0; fi
  done
  echo /tmp/fastckpt-bench
}
SIZE_BYTES=$("$PY" -c "from fastckpt.rules.units import parse_size; print(parse_size('$SIZE'))")
WORKDIR=$(pick_workdir $((SIZE_BYTES * 7 / 2 + (1 << 30))))
LEFT=$((BUDGET_S - $(elapsed) - 25))
if [ $LEFT -lt 60 ]; then LEFT=60; fi
ts "benchmark: $SIZE on $DEVICE in $WORKDIR ($(stat -f -c %T "$WORKDIR")), ${LEFT}s budget (log: bench.log)"
"$PY" -m fastckpt.bench.cli --size "$SIZE" --device "$DEVICE" --workdir "$WORKDIR" \
  --out "$OUT" --repeats "$REPEATS" --time-budget-s "$LEFT" --worker-timeout-s 240 --keep \
  --loaders "${FASTCKPT_GPU_CHECK_LOADERS:-all}" \
  2>&1 | tee "$OUT/bench.log" | grep -E --line-buffered '^\[bench|^note:|FAILED|warning|error'
rc=${PIPESTATUS[0]}
case $rc in 0) BENCH_STATUS=ok ;; *) BENCH_STATUS="exit $rc" ;; esac

# ------------------------------------------------------------------- pipeline knob sweep
TUNE_STATUS=skipped
TUNE_S=${FASTCKPT_GPU_CHECK_TUNE_S:-100}
FCK_DIR=$(find "$WORKDIR" -name fastckpt.index -printf '%h\n' 2>/dev/null | head -1)
if [ -n "$FCK_DIR" ] && [ "$TUNE_S" -gt 0 ]; then
  ts "knob sweep on $FCK_DIR (${TUNE_S}s max; log: tune.log, results in sweep/)"
  # every configuration in its own fresh process, settings in that process's environment
  timeout "$TUNE_S" "$PY" -m fastckpt.bench.cli --scenario gpu-sweep --checkpoint "$FCK_DIR" \
    --device "$DEVICE" --workdir "$WORKDIR" --out "$OUT/sweep" --repeats 1 --keep \
    >"$OUT/tune.log" 2>&1
  rc=$?
  case $rc in 0) TUNE_STATUS=ok ;; 124) TUNE_STATUS="timed out (partial)" ;; *) TUNE_STATUS="exit $rc" ;; esac
  cat "$OUT/tune.log"
fi
# ------------------------------------------------------------- Loader tiers (dram / gpu)
TIERS_STATUS=skipped
TIERS_S=${FASTCKPT_GPU_CHECK_TIERS_S:-90}
if [ -n "$FCK_DIR" ] && [ "$TIERS_S" -gt 0 ]; then
  ts "tier scenarios on $FCK_DIR (${TIERS_S}s max each; log: tiers.log)"
  TIERS_STATUS=ok
  for sc in dram-tier gpu-tier; do
    timeout "$TIERS_S" "$PY" -m fastckpt.bench.tiers_scenario "$sc" "$FCK_DIR" --repeats 3 \
      --json "$OUT/$sc.json" >>"$OUT/tiers.log" 2>&1 || TIERS_STATUS="$sc failed"
  done
  cat "$OUT/tiers.log"
fi
rm -rf "$WORKDIR" 2>/dev/null

# ---------------------------------------------------------------------------------- results
echo
ts "done: build $BUILD_STATUS; gpu tests $TESTS_STATUS; benchmark $BENCH_STATUS; sweep $TUNE_STATUS; tiers $TIERS_STATUS; files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
echo
if [ -f "$OUT/results.md" ]; then
  cat "$OUT/results.md"
else
  echo "no results.md; the end of bench.log:"
  tail -30 "$OUT/bench.log"
fi
