#!/usr/bin/env bash
# One device call for the targets of BENCHMARKS.md: the GPU tests first (all of them run: a failure is
# reported, not a stop), then benchmarks/peers.py per case, ppalli beside the Unsloth runs its target reads.
# Needs .peers/ carried (../shared/tools/peer-site.sh .peers), and .gpu-data/ for the tests that read the
# shared data (tests/gpu/test_convergence_gpu.py; skipped without it). A call has 10 minutes: about 3 for the
# tests, 2.5-4 per case (T1 with all its peers ~4; `--stacks ppalli,unsloth --gc off` halves it).
#   bash benchmarks/gpu_targets.sh OUT_DIR [tests] [gemm] [T1|T2|T3|T3-8.8|T4[-steady[-rev]] ...]
# gemm: benchmarks/bench_gemm.py, the step's base GEMMs shape by shape (~1 min).
# energy: benchmarks/bench_energy.py (~1 min): mJ a call of T1's kernel kinds, the newest H100 T1 profile priced.
# fa4: flash-attn 4 (benchmarks/fa4_bundle.sh: .fa4/a carried in an earlier call, .fa4/b in this one):
# bench_attention.py with it, then the flash-attn GPU tests; T4-fa4 (T1-fa4): T4 (T1) steady, Unsloth (GC off)
# first without it on the path, then ppalli's own plan (flash-attn 4 on Hopper once installed), then
# Unsloth with torch's SDPA flash kernels run as FA4 (what its padding-free trainer activates), all appended.
# T1-fa4-lean: ppalli's own plan with flash-attn 4, then Unsloth (GC off): T1-fa4 in ~1.5 min less.
# T1-fa4-pairs: the same two runs twice, in the order ppalli, Unsloth, Unsloth, ppalli (~6.5 min): two readings of
# the ratio in one call, each stack once first and once last (the 12-06 T1 ratios moved 1.147-1.170 between calls).
# T3-8.8 is T3 with ppalli planned to an 8.8 GiB budget (peak under Unsloth QLoRA's 8.06 GiB).
# qk-norm: the GPU tests of q/k norms inside RoPE's pass (kernels/qk_norm_rope.py), then bench_fast.py on Qwen3-8B's
# shapes (benchmarks/configs/config_qwen3-8b.json: 2 layers, then 6 with the loss), this tree against the one in
# .base/ (carried; e.g. `git archive e713e4c ppalli pyproject.toml | tar -x -C .base`, then this tree's
# benchmarks/*.py copied over it, so both sides time with one script). post-norm: the same for Gemma-2/3's
# post-norms in one pass (kernels/rms_norm_add.py) on Gemma-3-4B's shapes (config_gemma3-4b.json), against .base2/.
# T1-ab: T1 with flash-attn 4 (installed as in T1-fa4), Unsloth GC off first, then ppalli's own plan from this
# tree and from .base/ (peers.py --baseline) in the same call.
# T1-bisect: ppalli only (whatever attention is installed), this tree against .base/, then again against .base2/:
# two older trees and this one twice (its own spread) in ~4.5 min. A/Bs on 2026-12-06 moved 0.4-1% between trees,
# about one run's spread, so a bisect step wants both readings of this tree beside it.
# decode-qwen3: bench_decode_layers.py on Qwen3-8B's config (q/k norms inside rope's launches), this tree and .base2/.
# CASE-steady: the warm-up held to 15 s after its first round and ~17-20 s of timed steps, the clock a long
# run settles at (a capped H200 fell from 1864 to ~1600 MHz over the default 3 + 8 steps); -rev runs Unsloth
# first, then ppalli (--append), to see what the order does. ~1 min a stack more.
# Put PPALLI_COMMIT=<hash> before the command: the results record it (the device's copy may lack .git).
# Each case's results file and table land in OUT_DIR as CASE-<file> (2 files a case: the device tool brings
# back 8 files at most); peers.py's per-run logs stay in /tmp/ppalli-targets/CASE/logs.
set -uo pipefail
out=${1:?OUT_DIR}; shift
scratch=/tmp/ppalli-targets
export PYTHONPATH=/tmp/peer-site${PYTHONPATH:+:$PYTHONPATH}
[ -d /tmp/peer-site ] || tar xzf .peers/site.tgz -C /tmp
[ $# -gt 0 ] || set -- tests T3-8.8 T2
for what in "$@"; do
  case $what in tests|energy|gemm|fa4|qk-norm|post-norm|decode-qwen3|T4-fa4|T1-fa4|T1-fa4-lean|T1-fa4-pairs|T1-ab|T1-bisect|T1|T2|T3|T3-8.8|T4|T1-steady*|T2-steady*|T4-steady*) ;;
    *) echo "unknown: $what (tests, energy, gemm, fa4, qk-norm, post-norm, decode-qwen3, T4-fa4, T1-fa4[-lean|-pairs], T1-ab, T1-bisect, T1, T2, T3, T3-8.8, T4, T1/T2/T4-steady[-rev])" >&2
       exit 2 ;; esac
done
keep() {  # a case's results so far into OUT (a call stopped at its limit still brings back what was kept)
  for f in "$scratch/$1"/*.json "$scratch/$1"/*.md; do [ -f "$f" ] && cp "$f" "$out/$1-$(basename "$f")"; done
}
ab_fast() {  # NAME CONFIG BASE_DIR TEST_FILES...: the tests, then bench_fast.py layer + model, this tree and BASE_DIR
  # CONFIG: a file in benchmarks/configs or a name bench_fast.py knows (8b); AB_STACKS: bench_fast.py's --stacks
  local name=$1 cfg=$2 base=$3; shift 3
  [ -f "benchmarks/configs/$cfg" ] && cfg=$PWD/benchmarks/configs/$cfg
  python3 -m pytest -q -p no:cacheprovider "$@" > "$out/$name-tests.log" 2>&1
  tail -1 "$out/$name-tests.log"
  for side in new base; do
    dir=$([ $side = base ] && echo "$base" || echo .)
    [ -d "$dir/ppalli" ] || { echo "$name: no $dir/ppalli to time"; continue; }
    (cd "$dir" && python3 benchmarks/bench_fast.py --config "$cfg" --what layer --layers 2 --batch 4 --seq 2048 \
       --steps 20 --warmup 10 --stacks "${AB_STACKS:-hf,ppalli}" --out "$scratch/$name-$side" \
     && python3 benchmarks/bench_fast.py --config "$cfg" --what model --layers 6 --batch 4 --seq 2048 \
       --steps 10 --warmup 5 --stacks "${AB_STACKS:-hf,ppalli}" --out "$scratch/$name-$side-model")
    for f in "$scratch/$name-$side"*/*.md; do [ -f "$f" ] && { echo "## $side: $(basename "$f")"; cat "$f"; }; done \
      >> "$out/$name.md"  # one file a kind: the device tool brings back 8 files a call
    for f in "$scratch/$name-$side"*/*.json; do [ -f "$f" ] && { cat "$f"; echo; }; done >> "$out/$name.json"
  done
}
for what in "$@"; do
  t0=$SECONDS
  case $what in
    tests) python3 -m pytest -q -rP --durations=15 tests/gpu tests/unit/kernels -k "not compiles_for" -p no:cacheprovider \
             > "$out/gpu-tests.log" 2>&1
           tail -1 "$out/gpu-tests.log" ;;
    energy) python3 benchmarks/bench_energy.py --out "$out/energy.json" \
              --profile "$(ls benchmarks/results/*-h100-*t1-profile-head.txt | tail -1)" > "$out/energy.txt" 2>&1
            cat "$out/energy.txt" ;;
    gemm) python3 benchmarks/bench_gemm.py --out "$out/gemm.json" > "$out/gemm.txt" 2>&1; tail -40 "$out/gemm.txt" ;;
    fa4) ( . benchmarks/fa4_bundle.sh install
           python3 benchmarks/bench_attention.py --out "$out/attention.json" > "$out/attention.txt" 2>&1
           python3 -m pytest -q -rs tests/gpu/test_fast_gpu.py -k "flash_attn or attention_backends" -p no:cacheprovider \
             >> "$out/attention.txt" 2>&1 )
         grep -E "^[0-9a-z]+:|^  |passed|failed|SKIP" "$out/attention.txt" ;;
    qk-norm) ab_fast qk-norm config_qwen3-8b.json .base tests/unit/kernels/test_qk_norm_rope.py \
               tests/unit/fast/test_lora_qkv.py tests/gpu/test_fast_gpu.py ;;
    decode-qwen3) for dir in . .base2; do  # q/k norms inside rope's launches (this tree) against 9d6157b's
        (cd "$dir" && timeout 200 python3 benchmarks/bench_decode_layers.py \
           --model "$OLDPWD/benchmarks/configs/config_qwen3-8b.json" --out "/tmp/decode-$(basename "$dir").txt") \
          2>&1 | grep -E "slots|decode layers=|kernels:|Error"; done > "$out/decode-qwen3.txt"  # not the tables
        cat "$out/decode-qwen3.txt" ;;
    post-norm) { echo "## bench_rms_norm_add.py"; python3 benchmarks/bench_rms_norm_add.py --out /tmp/post-norm-op.json \
                 2>&1; } > "$out/post-norm.md"; cat "$out/post-norm.md"
               ab_fast post-norm config_gemma3-4b.json .base2 tests/unit/kernels/test_rms_norm_add.py ;;
    T4-fa4|T1-fa4)
      c=${what%%-*}; long="--warmup-s 15 --steps $([ "$c" = T1 ] && echo 40 || echo 90) --timeout 260"
      python3 benchmarks/peers.py --case "$c" --gc off --stacks unsloth --out "$scratch/$what" $long; keep "$what"
      ( . benchmarks/fa4_bundle.sh install
        python3 benchmarks/peers.py --case "$c" --gc off --stacks ppalli --ppalli-setting auto \
          --out "$scratch/$what" --append $long; keep "$what"
        PPALLI_PEERS_FLASH_IMPL=FA4 python3 benchmarks/peers.py --case "$c" --gc off --stacks unsloth \
          --out "$scratch/$what" --append $long ) ;;
    T1-fa4-lean)  # T1-fa4 without its third run: ppalli's own plan with flash-attn 4, then Unsloth (GC off)
      long="--warmup-s 15 --steps 40 --timeout 260"
      ( . benchmarks/fa4_bundle.sh install
        python3 benchmarks/peers.py --case T1 --gc off --stacks ppalli --ppalli-setting auto \
          --out "$scratch/$what" $long; keep "$what" )
      python3 benchmarks/peers.py --case T1 --gc off --stacks unsloth --out "$scratch/$what" --append $long ;;
    T1-fa4-pairs) long="--warmup-s 15 --steps 40 --timeout 260"
      ( . benchmarks/fa4_bundle.sh install
        for stack in ppalli unsloth unsloth ppalli; do
          python3 benchmarks/peers.py --case T1 --gc off --stacks $stack --ppalli-setting auto --out "$scratch/$what" \
            --append $long; keep "$what"
        done ) ;;
    T1-ab) long="--warmup-s 15 --steps 40 --timeout 260"
      python3 benchmarks/peers.py --case T1 --gc off --stacks unsloth --out "$scratch/$what" $long; keep "$what"
      ( . benchmarks/fa4_bundle.sh install
        python3 benchmarks/peers.py --case T1 --gc off --stacks ppalli --ppalli-setting auto --baseline .base \
          --out "$scratch/$what" --append $long ) ;;
    T1-bisect) long="--warmup-s 15 --steps 40 --timeout 200"
      for base in .base .base2; do
        [ -d "$base/ppalli" ] || { echo "T1-bisect: no $base/ppalli"; continue; }
        python3 benchmarks/peers.py --case T1 --gc off --stacks ppalli --ppalli-setting auto --baseline "$base" \
          --out "$scratch/$what" --append $long; keep "$what"
      done ;;
    T1) python3 benchmarks/peers.py --case T1 --gc off --stacks ppalli,unsloth --out "$scratch/$what" --timeout 200 ;;
    T3-8.8) python3 benchmarks/peers.py --case T3 --ppalli-setting budget=8.8 --stacks ppalli,unsloth \
              --out "$scratch/$what" --timeout 200 ;;
    T2|T3|T4) python3 benchmarks/peers.py --case "$what" --stacks ppalli,unsloth --out "$scratch/$what" --timeout 200 ;;
    *-steady*)
      c=${what%%-*}; steps=$(case $c in T1) echo 40;; T2) echo 34;; *) echo 90;; esac)  # ~17-20 s of steps each
      gc=$([ "$c" = T2 ] || echo "--gc off"); long="--warmup-s 15 --steps $steps --timeout 260"
      if [ "$what" = "$c-steady" ]; then
        python3 benchmarks/peers.py --case "$c" $gc --stacks ppalli,unsloth --out "$scratch/$what" $long
      else
        python3 benchmarks/peers.py --case "$c" $gc --stacks unsloth --out "$scratch/$what" $long
        python3 benchmarks/peers.py --case "$c" $gc --stacks ppalli --out "$scratch/$what" --append $long
      fi ;;
  esac 2>&1 | grep -E "^\[T|^Target|passed|failed|error|TFLOP"
  keep "$what"
  echo "$what: $((SECONDS - t0)) s"
done
