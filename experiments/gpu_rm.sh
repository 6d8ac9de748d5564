#!/usr/bin/env bash
# Reward-model accuracy on full world pairs (experiments/rm_world.py) for three SFT trunks and
# two reward-model schedules, all at once on one GPU (about 4 minutes on an H200):
#   A: the world recipe's upstream as is (4 layers, 128 wide; 600 tasks per task type)
#   B: the same with tasks.n_train=3000 (five times the SFT data)
#   C: 8 layers, 512 wide, 2,000 pretraining steps, with tasks.n_train=3000, SFT 2,000 steps
# each scored with the reward stage's defaults (lr 3e-4, 300 steps) and with lr 1e-4, 1500 steps.
# Usage: OUT=folder bash experiments/gpu_rm.sh
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
py=${PYTHON:-python3}; T=${LIMIT_S:-270}; R=${RUNS:-/tmp/gpu_rm}
UP="stages=tokenizer,pretrain,sft"
BIG="pretrain.model.n_layer=8 pretrain.model.n_head=8 pretrain.model.n_embd=512 pretrain.optim.lr=6e-4 pretrain.train.max_steps=2000 sft.train.max_steps=2000"
rmw() {  # trunk tag, RM tag, extra reward args
  $py experiments/rm_world.py --sft $R/$1/sft --out $R/rm_$1_$2 --quiet "${@:3}" ${RM_EXTRA:-} \
    > "$OUT/rm_$1_$2.log" 2>&1
}
chain() {  # trunk tag, upstream overrides
  local tag=$1; shift
  $py -m lmforge run recipes/world.toml --out $R/$tag --quiet $UP "$@" ${UP_EXTRA:-} \
    > "$OUT/up_$tag.log" 2>&1 || return
  rmw $tag default &
  rmw $tag slow optim.lr=1e-4 train.max_steps=1500 train.eval_every=500 &
  wait
}
chain A & a=$!
chain B tasks.n_train=3000 & b=$!
chain C tasks.n_train=3000 $BIG & c=$!
(sleep $T; echo "time limit: stopping" >> "$OUT/done.log"; pkill -f rm_world.py; pkill -f "lmforge run") &
w=$!
wait $a $b $c; kill $w 2>/dev/null
echo "finished" >> "$OUT/done.log"
cd $R && find . \( -name 'rm_world.json' -o -name 'metrics.jsonl' \) -size -4M -print0 2>/dev/null \
  | tar czf "$OUT/gpu_rm.tgz" --null -T - 2>/dev/null
