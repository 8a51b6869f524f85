#!/usr/bin/env bash
# `ppalli train` on the GPU machine (issue 2 item 4, issue 4 item 3): random-weight Llama architectures on
# ko_chatbot_qa. Needs .gpu-data/ (copies of ../shared/data/{ko_chatbot_qa,tokenizer_llama3}) carried along.
#   bash benchmarks/gpu_train_runs.sh OUT_DIR [which...]
#   which: ref1b ref1b2 fast1b fp81b ref1bq fast1bq cap12 cap24 det1b det1b2 fast20 fast20b dpo1b orpo1b simpo1b
# dpo1b, orpo1b, simpo1b: the preference objectives on ko_preference_rlhf (.gpu-data/ko_preference_rlhf carried),
# 30 steps of 8 pairs, pairs packed (the default), the fast path's fused log-prob kernel.
# fp81b: fast1b with plan.fp8=true (e4m3 base GEMMs), to read its losses against fast1b's.
# ref1b2 repeats ref1b: the reference path's own run-to-run spread, the floor for a fast-vs-reference tolerance.
# det1b and det1b2: 20 steps with plan.deterministic=true, twice (the whole recipe in that mode: data, eval,
# sample answers, save); fast20 and fast20b the same two in the default mode, for contrast.
set -uo pipefail
out=${1:?OUT_DIR}; shift
which=${*:-ref1b fast1b cap12 cap24}
data=(--set data.path=.gpu-data/ko_chatbot_qa/ChatbotData.csv --set model.tokenizer=.gpu-data/tokenizer_llama3
      --set model.name_or_path=.gpu-data/tokenizer_llama3/config_llama-3.2-1b.json
      --set logging.progress=plain --set output_dir=/tmp/ppalli-runs/{name})
run() {  # name, then extra args
  local name=$1; shift
  local t0=$SECONDS
  python3 -m ppalli.cli train configs/llama-3.2-1b-random-ko-chatbot.yaml "${data[@]}" --set name="$name" "$@" \
    > "$out/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s"
  python3 benchmarks/collect_run.py "/tmp/ppalli-runs/$name" "$out/$name.json"
}
for w in $which; do
  case $w in
    ref1b) run ref-1b --set plan.fast_path=off ;;
    ref1b2) run ref-1b-2 --set plan.fast_path=off ;;
    fast1b) run fast-1b --set plan.fast_path=on ;;
    fp81b) run fp8-1b --set plan.fast_path=on --set plan.fp8=true ;;
    ref1bq) run ref-1b-nf4 --set plan.fast_path=off --set plan.quantization=nf4 ;;
    fast1bq) run fast-1b-nf4 --set plan.fast_path=on --set plan.quantization=nf4 ;;
    cap12) run cap12-8b --set model.name_or_path=configs/models/llama-3.1-8b.json --set train.max_steps=30 \
             --set plan.memory_budget_gib=12 ;;
    det1b) run det-1b --set plan.deterministic=true --set train.max_steps=20 ;;
    det1b2) run det-1b-2 --set plan.deterministic=true --set train.max_steps=20 ;;
    fast20) run fast-20 --set train.max_steps=20 ;;
    fast20b) run fast-20b --set train.max_steps=20 ;;
    dpo1b|orpo1b|simpo1b) run "${w%1b}-1b" --set train.objective="${w%1b}" --set data.columns={} \
             --set data.path=.gpu-data/ko_preference_rlhf/step2_yitingxie_ko.jsonl --set train.max_steps=30 \
             --set train.batch_size=8 ;;
    cap24) run cap24-8b --set model.name_or_path=configs/models/llama-3.1-8b.json --set train.max_steps=30 \
             --set plan.memory_budget_gib=24 ;;
  esac
done
