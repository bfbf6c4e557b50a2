#!/usr/bin/env bash
# The bench suites on an NVIDIA GPU machine, sized to fit one 10-minute device call; results under $OUT.
#
#   OUT=/path/to/out bash bench/gpu_run.sh            # from the repository root
#
# Two environments:
#  * image (the default when it works): the machine's own python3 already has CUDA jax, flax, optax,
#    orbax, transformers and torch (this workplace's lent H200s: no network there). lmgrad runs from the
#    checkout (PYTHONPATH); the few packages the image lacks (ml-collections, gguf) come as wheels in
#    .whl/, made here beforehand by `bash bench/gpu_wheels.sh` and carried along (device tool:
#    carry=[".whl"]).
#  * venv (GPU_RUN_ENV=venv, a machine that reaches PyPI): a venv with requirements-test.txt and the CUDA
#    jax wheel matching the pinned jax.
# GPU_RUN_SIZE=quick (default: speed and scaling, each cut at 4 minutes) | full (GPT-2 small → XL, long) | tiny (a
# flow check on any machine; with GPU_RUN_ALLOW_CPU=1 it runs on a CPU).
# Steps (each logged; a failing step is recorded and the next one still runs):
#  1. environment: jax and torch must see the GPU (else stop, unless GPU_RUN_ALLOW_CPU=1);
#  2. `python -m bench run --suite=speed`: factored sketch vs plain step, large matmul and the torch
#     hook peer, GPT-2 small at T = 1024 (issue 13's GPU goal: sequences/s of 1,024 tokens, MFU);
#  3. `--suite=scaling` (batch, sequence length, width at full depth, rank; device peak memory);
#  4. `--suite=kernels`: attention, batched matmul, MLP and vocabulary head, JAX vs torch (T = 1024);
#  5. `--suite=fusion` (full only).
# Results: $OUT/gpu_run.log and $OUT/gpu_results.tgz (the suites' .jsonl records and .md tables, the
# scaling plots, env.txt): one archive because the device tool returns at most 8 files. Unpack it and
# append the .jsonl lines to bench/results/ (their device/backend fields set them apart from CPU lines).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench_gpu_out}
SIZE=${GPU_RUN_SIZE:-quick}
STAGE=$(mktemp -d /tmp/gpu_run.XXXXXX)
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
log() { echo "[gpu_run $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
step() { log "start: $*"; if "$@" >>"$LOG" 2>&1; then log "done: $1 ${2:-}"; else log "FAILED ($?): $*"; fi; }
pack() { tar czf "$OUT/gpu_results.tgz" -C "$STAGE" . && log "results: $OUT/gpu_results.tgz ($(ls "$STAGE" | wc -l) files)"; }
trap pack EXIT

# 1. environment -------------------------------------------------------------------------------
nvidia-smi >"$STAGE/env.txt" 2>&1 || log "nvidia-smi failed: is there a GPU?"
ENV_KIND=${GPU_RUN_ENV:-image}
if [ "$ENV_KIND" = image ]; then
  P=${PYTHON:-python3}
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$P" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >>"$LOG" 2>&1 || log "installing the carried wheels failed"
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  VENV=${VENV:-/tmp/lmgrad-gpu-venv}
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || { log "venv failed"; exit 1; }
  P="$VENV/bin/python"
  step "$P" -m pip install -q --upgrade pip
  step "$P" -m pip install -q -r requirements-test.txt
  step "$P" -m pip install -q --no-deps -e .
  JAXV=$("$P" -c "import jax; print(jax.__version__)")
  "$P" -m pip install -q "jax[cuda13]==$JAXV" >>"$LOG" 2>&1 || step "$P" -m pip install -q "jax[cuda12]==$JAXV"
fi
"$P" - >>"$STAGE/env.txt" 2>&1 <<'EOF'
import os, jax, torch
print("jax", jax.__version__, jax.devices())
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.version.cuda)
import flax, optax, transformers, ml_collections, lmgrad
print("flax", flax.__version__, "optax", optax.__version__, "transformers", transformers.__version__)
if os.environ.get("GPU_RUN_ALLOW_CPU") != "1":
    assert jax.devices()[0].platform == "gpu", "jax sees no GPU"
EOF
if [ $? -ne 0 ]; then log "environment check failed (see env.txt below)"; cat "$STAGE/env.txt" | tee -a "$LOG"; exit 1; fi
cat "$STAGE/env.txt" | tee -a "$LOG"

export OMP_WAIT_POLICY=PASSIVE XLA_PYTHON_CLIENT_PREALLOCATE=false
# The suites append to bench/results/<suite>.{jsonl,md}; this run's lines go to the archive and the
# checkout's files are put back as they were.
RES=bench/results
for s in speed scaling fusion kernels; do [ -f "$RES/$s.jsonl" ] && cp "$RES/$s.jsonl" "$STAGE/.$s.before"; done
BACKUP=$(mktemp -d /tmp/gpu_run_res.XXXXXX)
cp "$RES"/*.md "$RES"/scaling_*.png "$BACKUP"/ 2>/dev/null || true
collect() {
  for s in speed scaling fusion kernels; do
    [ -f "$RES/$s.jsonl" ] || continue
    n=$( [ -f "$STAGE/.$s.before" ] && wc -l <"$STAGE/.$s.before" || echo 0 )
    tail -n +"$((n + 1))" "$RES/$s.jsonl" >"$STAGE/$s.jsonl"
    [ -f "$STAGE/.$s.before" ] && cp "$STAGE/.$s.before" "$RES/$s.jsonl"
    [ -f "$RES/$s.md" ] && cp "$RES/$s.md" "$STAGE/$s.md"
  done
  cp "$RES"/scaling_*.png "$STAGE"/ 2>/dev/null || true
  cp "$BACKUP"/* "$RES"/ 2>/dev/null || true
  rm -f "$STAGE"/.*.before
}

# 2.–5. suites ---------------------------------------------------------------------------------
case "$SIZE" in
  tiny)
    step "$P" -m bench run --suite=speed --shapes gpt2-small --seqs 16 --batches 2 --reps 1 --matmul_n 256 \
      --peers torch_hooks --scaling_layers 1
    step "$P" -m bench run --suite=scaling --reps 1 --scaling_layers 1 --sweep_batches 1 2 --sweep_batches_exact \
      --sweep_batches_medium --sweep_batches_plain --sweep_seqs 16 --seq_batch 1 --sweep_shapes gpt2-small \
      --sweep_shapes_exact --sweep_depths --sweep_depths_exact --sweep_rs 4
    step "$P" -m bench run --suite=fusion --shapes gpt2-small --seqs 16 --batches 2 --reps 1
    step "$P" -m bench run --suite=kernels -- --T 16 --reps 2
    ;;
  quick)  # 4 + 4 minutes at most, then 40 s: one 10-minute device call with the start and the transfers
    step timeout 240 "$P" -m bench run --suite=speed --shapes gpt2-small --seqs 128 1024 --batches 16 --reps 5 \
      --matmul_n 8192 --peers torch_hooks torch_plain
    step timeout 240 "$P" -m bench run --suite=scaling --reps 3 --scaling_layers 0 --sweep_batches 1 32 \
      --sweep_batches_exact 8 --sweep_batches_medium --sweep_batches_plain --sweep_seqs 512 1024 --seq_batch 8 \
      --sweep_shapes gpt2-small gpt2-large --sweep_shapes_exact --sweep_depths --sweep_depths_exact --sweep_rs 64
    step timeout 40 "$P" -m bench run --suite=kernels -- --T 1024
    ;;
  full)
    step "$P" -m bench run --suite=speed --shapes gpt2-small gpt2-medium --seqs 128 512 1024 --batches 8 32 \
      --reps 5 --matmul_n 8192 --vmap_chunk 4 --scaling_layers 0
    # torch.func vmap(grad) holds a per-pair copy of every gradient: left out on the large shapes.
    step "$P" -m bench run --suite=speed --shapes gpt2-large gpt2-xl --seqs 128 512 --batches 8 32 --reps 5 \
      --matmul_n 8192 --peers torch_hooks torch_plain --scaling_layers 0
    step "$P" -m bench run --suite=scaling --reps 3 --scaling_layers 0 --sweep_batches 1 4 16 64 128 \
      --sweep_batches_exact 1 4 16 --sweep_batches_medium 1 16 64 --sweep_batches_plain 1 16 64 \
      --sweep_seqs 16 64 128 256 512 1024 --seq_batch 8 --sweep_shapes gpt2-small gpt2-medium gpt2-large gpt2-xl \
      --sweep_shapes_exact gpt2-small gpt2-medium --sweep_depths 2 4 8 12 --sweep_depths_exact 2 12 \
      --sweep_rs 4 16 64 128
    step "$P" -m bench run --suite=fusion --shapes gpt2-small gpt2-large --seqs 128 512 --batches 16 --reps 5 \
      --scaling_layers 0
    step "$P" -m bench run --suite=kernels -- --T 128
    step "$P" -m bench run --suite=kernels -- --T 1024
    ;;
  *) log "GPU_RUN_SIZE must be tiny, quick or full, not $SIZE"; exit 2 ;;
esac
collect
log "finished"
