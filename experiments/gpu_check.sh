#!/usr/bin/env bash
# The checks this project runs when a session is lent one CUDA GPU (about 9 minutes):
#   1. the CUDA-only test;  2. bench/gpu.py (training MFU, sampling vs HF);
#   3. the world recipe on the GPU with a stronger trunk (8 layers, 512 wide, longer
#      pretraining and SFT), the upstream stages first; then, side by side, the full-world-pairs
#      reward model (experiments/rm_world.py) on its SFT model and the downstream stages.
# Usage: OUT=folder bash experiments/gpu_check.sh   (logs and results land in $OUT)
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
nvidia-smi -L > "$OUT/gpu.log" 2>&1
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$OUT/gpu.log" 2>&1
timeout 60 $py -m pytest -q -p no:cacheprovider tests/data/test_spans.py >> "$OUT/gpu.log" 2>&1
echo "pytest rc $?" >> "$OUT/gpu.log"
timeout ${BENCH_S:-170} $py bench/gpu.py --repeats 2 --steps 10 --warmup 3 > "$OUT/bench.log" 2>&1
echo "bench rc $?" >> "$OUT/bench.log"; cp bench/results/gpu.json "$OUT/" 2>/dev/null
W="pretrain.model.n_layer=8 pretrain.model.n_head=8 pretrain.model.n_embd=512 pretrain.optim.lr=6e-4
   pretrain.train.max_steps=${PRE_STEPS:-3000} sft.train.max_steps=${SFT_STEPS:-2000}"
RUN=${RUN:-/tmp/world_gpu}
timeout ${UP_S:-150} $py -m lmforge run recipes/world.toml --out $RUN --quiet stages=tokenizer,pretrain,sft $W > "$OUT/world.log" 2>&1
echo "upstream rc $?" >> "$OUT/world.log"
timeout ${RM_S:-150} $py experiments/rm_world.py --sft $RUN/sft --out /tmp/rm_world_gpu --quiet > "$OUT/rm_world.log" 2>&1 &
timeout ${DOWN_S:-200} $py -m lmforge run recipes/world.toml --out $RUN --quiet \
  stages=tokenizer,pretrain,sft,sample,label,reward,ppo,dpo,eval,report $W >> "$OUT/world.log" 2>&1
echo "downstream rc $?" >> "$OUT/world.log"
wait
cd /tmp && find world_gpu rm_world_gpu \( -name '*.json' -o -name 'metrics.jsonl' -o -name '*.md' \) \
  -size -4M -print0 2>/dev/null | tar czf "$OUT/runs.tgz" --null -T - 2>/dev/null
echo done
