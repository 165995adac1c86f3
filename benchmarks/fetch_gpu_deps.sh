#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) HERE with what benchmarks/gpu_check.sh needs on the GPU box, which has
# no network, no liburing and no fio. Carry it with run(..., carry=[".gpu"]).
#
#   .gpu/debs/  liburing2 + liburing-dev (the io_uring engine), pkgconf + libpkgconf3 (in case the
#               box has no pkg-config): Debian 12 packages, unpacked there with dpkg -x.
#   .gpu/bin/fio  fio built here from Debian's own source package (apt-get source fio), static,
#               without the ceph/gluster/rdma/pmem/nbd engines: about 3 MB, runs on any x86-64
#               Linux (Debian's own fio binary links 56 more library packages). --fio=none
#               fetches no fio (the harness then measures the O_DIRECT ceiling with fastckpt's
#               own engine).
#   .gpu/core/  fastckpt's C++ core built HERE for the box's Python 3.12 (a pyenv or system
#               python3.12 is needed here; liburing linked in statically): gpu_check.sh copies it
#               into fastckpt/ there, so the box needs no build (it builds if the file is absent
#               or does not import).
#   .gpu/whl/   cp312 manylinux x86_64 wheels of the peers: runai-model-streamer, fastsafetensors,
#               instanttensor (versions of the project's benchmark brief). Their dependencies (torch, numpy,
#               humanize, typer) are already on the box.
#
# Usage: bash benchmarks/fetch_gpu_deps.sh [--fio=static|none]
set -euo pipefail
cd "$(dirname "$0")/.."

FIO_MODE=static
for arg in "$@"; do
  case "$arg" in
    --fio=static|--fio=none) FIO_MODE=${arg#--fio=} ;;
    *) echo "usage: $0 [--fio=static|none]" >&2; exit 2 ;;
  esac
done
PEERS=(runai-model-streamer==0.16.1 fastsafetensors==0.5.0 instanttensor==0.2.2)

rm -rf .gpu/debs .gpu/bin .gpu/whl .gpu/core
mkdir -p .gpu/debs .gpu/bin .gpu/whl .gpu/core

echo "== fastckpt core for cp312"
PY312=${PY312:-}
if [ -z "$PY312" ]; then
  for cand in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 "$(command -v python3.12 || true)"; do
    if [ -n "$cand" ] && [ -x "$cand" ] && "$cand" -c pass 2>/dev/null; then PY312=$cand; break; fi
  done
fi
if [ -n "$PY312" ]; then
  wtmp=$(mktemp -d)
  "$PY312" -m pip wheel -q --no-deps -w "$wtmp" . >/dev/null
  (cd .gpu/core && unzip -q -o -j "$wtmp"/*.whl 'fastckpt/_core.*.so')
  rm -rf "$wtmp"
  ls -la .gpu/core
else
  echo "no python3.12 here: the box will build the core itself (about a minute)"
fi

echo "== .deb files"
(cd .gpu/debs && apt-get download -q liburing2 liburing-dev pkgconf-bin libpkgconf3 >/dev/null)

if [ "$FIO_MODE" = static ]; then
  echo "== fio (static, from Debian's source package)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  . /etc/os-release
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/parts"
  cat >"$tmp/parts/src.sources" <<EOF
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: ${VERSION_CODENAME:-bookworm}
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # A private apt state: the machine's own sources and lists stay untouched.
  APT=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$tmp/parts"
    -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache")
  apt-get "${APT[@]}" -qq update
  (cd "$tmp" && apt-get "${APT[@]}" -qq source --download-only fio >/dev/null 2>&1)
  mkdir "$tmp/src"
  tar xzf "$tmp"/fio_*.orig.tar.gz -C "$tmp/src" --strip-components=1
  (
    cd "$tmp/src"
    ./configure --build-static --disable-native --disable-numa --disable-rdma --disable-rados \
      --disable-rbd --disable-http --disable-gfapi --disable-libnfs --disable-pmem \
      --disable-xnvme --disable-libzbc --disable-tcmalloc --disable-dfs >"$tmp/configure.log"
    make -j"$(nproc)" fio >"$tmp/make.log" 2>&1
  ) || { tail -20 "$tmp/make.log" "$tmp/configure.log" >&2; exit 1; }
  strip -o .gpu/bin/fio "$tmp/src/fio"
  .gpu/bin/fio --version
  .gpu/bin/fio --enghelp | grep -q io_uring && echo "fio has io_uring"
fi

echo "== peer wheels (cp312, manylinux x86_64)"
PLATFORMS=()
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .gpu/whl "${PEERS[@]}" 2>&1 | grep -v '^WARNING' || true

echo "== .gpu"
find .gpu -type f -printf '%8k KiB  %p\n' | sort -k3
du -sh .gpu
