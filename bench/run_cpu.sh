#!/usr/bin/env bash
# The CPU benchmarks in their short form: input pipeline, then train step (+ pipeline/step
# ratio). JSON lines go to stdout and to $BENCH_OUT; each script ends with a table.
#   bash bench/run_cpu.sh            # from the repository root, inside the project's venv
# Records are written once under $MICLE_BENCH_DATA (default /tmp/micle_bench_data).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${BENCH_OUT:-${TMPDIR:-/tmp}/bench_cpu_$(date +%Y%m%d_%H%M%S).jsonl}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
START=$(date +%s)
echo "# $(date -Is) load: $(cut -d' ' -f1-3 /proc/loadavg) cpus: $(nproc) -> $OUT"
"$PY" -m bench.pipeline --quick --jsonl="$OUT" || echo "# bench.pipeline failed (rc=$?)"
echo "# pipeline done after $(( $(date +%s) - START ))s; load: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" -m bench.train_step --quick --jsonl="$OUT" || echo "# bench.train_step failed (rc=$?)"
echo "# all done after $(( $(date +%s) - START ))s; load: $(cut -d' ' -f1-3 /proc/loadavg)"
