#!/usr/bin/env bash
# flash-attn 4 (CuTe DSL kernels, `pip install --pre flash-attn-4`) for the GPU machine, which reaches no
# registry and takes 64 MiB of carried files a call. Its CUTLASS DSL compiler is one 193 MB library
# (nvidia-cutlass-dsl-libs-cu13 4.8.1, a 92 MB wheel): xz takes it to 50 MB, so the bundle goes in two carries.
#   here:   bash benchmarks/fa4_bundle.sh pack        -> .fa4/a (50 MB), .fa4/b (23 MB); both git-ignored
#   device: . benchmarks/fa4_bundle.sh install        (in each call; idempotent)
# Call 1 carries .fa4/a: install stages its library in every folder of STAGES. A later call on the same warm
# machine carries .fa4/b: install finds a staged copy, lays out /tmp/fa4site and puts it on PYTHONPATH, and says
# which stages lasted. They lie outside the tree each call re-sends: an ignored folder of the repo did not last
# (2026-12-05: .fa4stage/, staged in one call, was gone in the next on the same warm machine). All four of these
# lasted from one call to the next three on one warm H200 (2026-12-05, 11:11-11:24 UTC); the library still goes to
# each (193 MB apiece; the machine has 64 GiB of disk, 128 GiB of memory) until one is seen to fail.
# cp312: the device's python3 (KINDS.md). The device already has cuda-bindings, cuda-pathfinder, protobuf.
CUTLASS=4.8.1
WHEELS=("nvidia-cutlass-dsl==$CUTLASS" "nvidia-cutlass-dsl-libs-base==$CUTLASS" "nvidia-cutlass-dsl-libs-core==$CUTLASS"
        "nvidia-cutlass-dsl-libs-cu13==$CUTLASS" quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2
        torch-c-dlpack-ext==0.1.5 einops==0.8.2 flash-attn-4==4.0.0b40)
IR=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
RT=nvidia_cutlass_dsl/cu13/lib/libcute_dsl_runtime.so
STAGES=(/tmp/fa4stage /var/tmp/fa4stage "$HOME/.cache/fa4stage" /dev/shm/fa4stage)
SITE=/tmp/fa4site

unxz_to() {  # python's lzma: the machine may lack xz
  python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'), 1 << 24)" "$1" "$2"
}

pack() (  # a subshell: its settings stay its own
  set -uo pipefail
  local tmp
  tmp=$(mktemp -d) || return 1
  for w in "${WHEELS[@]}"; do
    python3 -m pip download -q --pre --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
      -d "$tmp/whl" "$w" || return 1
  done
  rm -rf .fa4 && mkdir -p .fa4/a .fa4/b "$tmp/cu13"
  (cd "$tmp/cu13" && unzip -q "$tmp"/whl/nvidia_cutlass_dsl_libs_cu13-*.whl) || return 1
  xz -9e -T2 -c "$tmp/cu13/$IR" > .fa4/a/ir.so.xz || return 1
  xz -9e -T2 -c "$tmp/cu13/$RT" > .fa4/b/rt.so.xz || return 1
  rm "$tmp/cu13/$IR" "$tmp/cu13/$RT" "$tmp"/whl/nvidia_cutlass_dsl_libs_cu13-*.whl
  tar czf .fa4/b/cu13-rest.tgz -C "$tmp/cu13" .
  cp "$tmp"/whl/*.whl .fa4/b/
  rm -rf "$tmp"
  du -sh .fa4/a .fa4/b
)

staged() {  # the first stage holding the library, or nothing
  local d
  for d in "${STAGES[@]}"; do [ -f "$d/ir.so" ] && { echo "$d/ir.so"; return; }; done
}

install() {
  local d ir
  if [ -f .fa4/a/ir.so.xz ]; then
    for d in "${STAGES[@]}"; do
      if [ ! -f "$d/ir.so" ] && mkdir -p "$d" 2>/dev/null; then
        ir=$(staged)
        if [ -n "$ir" ]; then cp "$ir" "$d/ir.so"; else unxz_to .fa4/a/ir.so.xz "$d/ir.so"; fi
      fi
    done
    echo "fa4: staged $(stat -c %s "$(staged)") bytes in: $(for d in "${STAGES[@]}"; do [ -f "$d/ir.so" ] && printf '%s ' "$d"; done)"
  fi
  ir=$(staged)
  if [ -d .fa4/b ]; then
    echo "fa4: stages lasting from an earlier call: $(for d in "${STAGES[@]}"; do [ -f "$d/ir.so" ] && printf '%s ' "$d"; done)"
  fi
  if [ -d .fa4/b ] && [ -n "$ir" ] && [ ! -f $SITE/.done ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .fa4/b/*.whl &&
      tar xzf .fa4/b/cu13-rest.tgz -C $SITE && mkdir -p "$(dirname $SITE/$RT)" &&
      cp "$ir" "$SITE/$IR" && unxz_to .fa4/b/rt.so.xz "$SITE/$RT" &&
      touch $SITE/.done && echo "fa4: installed in $SITE"
  fi
  if [ -f $SITE/.done ]; then  # the dsl_packages entry is what the wheel's .pth file would add
    export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "fa4: not installed yet (.fa4/a staged: $([ -n "$ir" ] && echo yes || echo no))"
  fi
}

case ${1:-} in
  pack) pack ;;
  install) install ;;
  *) echo "usage: bash benchmarks/fa4_bundle.sh pack | . benchmarks/fa4_bundle.sh install" >&2 ;;
esac
