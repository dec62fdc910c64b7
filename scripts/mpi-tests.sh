#!/usr/bin/env bash
# Multi-process tests of the MPI backend (crates/glm-dist, feature "mpi") under mpirun.
# Needs OpenMPI and libclang (Debian: libopenmpi-dev openmpi-bin libclang-dev).
#
# Add a test with one line:
#   run_mpi NAME NP CMD...                  passes if mpirun exits 0 within $MPI_TEST_LIMIT s
#   run_mpi_fails NAME NP REGEX CMD...      passes if it exits non-zero within the limit and its
#                                           output matches REGEX (grep -E)
#   expect_lines NAME COUNT REGEX           checks the last run's output has COUNT matching lines
# Exits non-zero if any test failed; the last line is the summary.
set -uo pipefail
cd "$(dirname "$0")/.."

MPI_TEST_LIMIT=${MPI_TEST_LIMIT:-120}
# Root in containers, more ranks than cores: both refused by OpenMPI unless asked for.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1

passed=0
failed=0
failures=()
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT

pass() { passed=$((passed + 1)); echo "ok   $1"; }
fail() {
  failed=$((failed + 1)); failures+=("$1"); echo "FAIL $1: $2"
  sed 's/^/     | /' "$LOG" | tail -n 30
}

# Runs mpirun with a hard time limit; sets $rc, $secs and $hung, output in $LOG. (mpirun itself
# exits 137 when a rank was SIGKILLed, so only the time tells a hang from that.)
mpi_exec() {
  local np=$1; shift
  local t0=$SECONDS
  timeout --kill-after=10 "$MPI_TEST_LIMIT" mpirun --oversubscribe -np "$np" "$@" >"$LOG" 2>&1
  rc=$?
  secs=$((SECONDS - t0))
  hung=0
  if [ "$rc" -eq 124 ] || { [ "$rc" -eq 137 ] && [ "$secs" -ge "$MPI_TEST_LIMIT" ]; }; then hung=1; fi
}

run_mpi() {
  local name=$1 np=$2; shift 2
  mpi_exec "$np" "$@"
  if [ "$hung" -eq 1 ]; then
    fail "$name" "hung: killed after ${MPI_TEST_LIMIT} s"
  elif [ "$rc" -ne 0 ]; then
    fail "$name" "mpirun exited with $rc after ${secs} s"
  else
    pass "$name (${secs} s)"
  fi
}

run_mpi_fails() {
  local name=$1 np=$2 regex=$3; shift 3
  mpi_exec "$np" "$@"
  if [ "$hung" -eq 1 ]; then
    fail "$name" "hung: killed after ${MPI_TEST_LIMIT} s"
  elif [ "$rc" -eq 0 ]; then
    fail "$name" "mpirun exited 0, a failure was expected"
  elif ! grep -Eq "$regex" "$LOG"; then
    fail "$name" "exited with $rc but the output does not match /$regex/"
  else
    pass "$name (exit $rc after ${secs} s)"
  fi
}

expect_lines() {
  local name=$1 count=$2 regex=$3 got
  got=$(grep -Ec "$regex" "$LOG")
  if [ "$got" -eq "$count" ]; then
    pass "$name"
  else
    fail "$name" "$got lines match /$regex/, expected $count"
  fi
}

command -v mpirun >/dev/null || { echo "mpi-tests: mpirun not found (apt-get install libopenmpi-dev openmpi-bin libclang-dev)"; exit 1; }
echo "mpi-tests: building (cargo build --release -p glm-dist --features mpi --examples)"
cargo build --release -p glm-dist --features mpi --examples || { echo "mpi-tests: build failed"; exit 1; }
CHECK=target/release/examples/mpi_check

# The backend checks (every collective, point-to-point, split, Megatron groups).
for np in 1 2 4; do
  run_mpi "mpi_check np=$np" "$np" "$CHECK"
  expect_lines "mpi_check np=$np: every rank ok" "$np" "^mpi_check: rank [0-9]+ of $np ok$"
done
# A SIGKILLed rank in the middle of a loop of all-reduces: the job ends, naming it.
run_mpi_fails "killed rank ends the job" 4 "rank 1 .*(exited on signal 9|Killed)|timed out" \
  "$CHECK" --kill-rank 1 --timeout 20
# A stuck rank: the others' all-reduce times out and aborts the job.
run_mpi_fails "stuck rank times out" 3 "all_reduce_f64 on rank [0-9] of 3 \(mpi\) timed out after 2 s" \
  "$CHECK" --stall-rank 2 --timeout 2

# Training: the equivalence tests of crates/glm-train/tests/dist.rs as MPI processes, and the
# `glm train` CLI's faults.
echo "mpi-tests: building (glm-train examples and glm with --features mpi)"
cargo build --release -p glm-train --features mpi --examples && cargo build --release -p glm-cli --features mpi ||
  { echo "mpi-tests: build failed"; exit 1; }
EQ=target/release/examples/mpi_equivalence
GLM=target/release/glm
WORK=$(mktemp -d)
trap 'rm -f "$LOG"; rm -rf "$WORK"' EXIT
i=0
for layout in "glm 2 1 1 0 0" "glm 1 1 2 1 0" "glm 2 1 2 1 1" "chatglm 2 1 2 0 0" "glm 4 1 1 0 1" "chatglm 1 1 4 1 0" \
  "glm 1 2 1 0 1" "chatglm 1 4 1 0 0" "glm 2 2 2 1 1"; do
  set -- $layout
  i=$((i + 1))
  run_mpi "equivalence $layout (arch tp pp dp zero dropout)" $(($2 * $3 * $4)) "$EQ" "$WORK/eq$i" $layout
  expect_lines "equivalence $layout: matches the single process" 1 "5 steps match the single process"
done

TRAIN=(train --max-steps 30 --save-every 2 --eval-every 0 --quiet --no-samples --tp 2)
run_mpi_fails "glm train: world size must be tp x pp x dp" 3 "world size 3 does not match the layout: tp 2 x pp 1 x dp 2" \
  "$GLM" "${TRAIN[@]}" --dp 2 --out "$WORK/mismatch"
# The 3D grid from the CLI: 8 processes, tp 2 x pp 2 x dp 2 with ZeRO-1, resumed on another layout.
run_mpi "glm train --tp 2 --pp 2 --dp 2 --zero 1" 8 "$GLM" train --max-steps 4 --save-every 2 --eval-every 2 --quiet \
  --no-samples --tp 2 --pp 2 --dp 2 --zero 1 --out "$WORK/grid"
expect_lines "glm train 3D grid: the stages reported" 1 "pipeline: 2 stages of \[2, 2\] layers"
run_mpi "glm train 3D grid resumed at tp 1 x pp 4" 4 "$GLM" train --max-steps 6 --save-every 2 --eval-every 0 --quiet \
  --no-samples --pp 4 --out "$WORK/grid" --resume
expect_lines "glm train 3D grid: resumed on the new layout" 1 "resumed at step 4"
# A rank that cannot open its data stops the whole run with its message (MPMD: rank 1 gets a bad
# data directory).
"$GLM" train --print-config | sed 's|^\[data\]$|[data]\ndir = "/nonexistent/shards"|' >"$WORK/bad-data.toml"
run_mpi_fails "a rank without its data stops the run" 1 "rank 1: .*nonexistent/shards" \
  "$GLM" "${TRAIN[@]}" --out "$WORK/data" : -np 1 "$GLM" "${TRAIN[@]}" --out "$WORK/data" --config "$WORK/bad-data.toml"
# A rank SIGKILLed mid-run: the job ends within the limit; the last complete checkpoint resumes.
name="a killed rank ends the run; it resumes from the last checkpoint"
t0=$SECONDS
timeout --kill-after=10 "$MPI_TEST_LIMIT" mpirun --oversubscribe -np 2 "$GLM" "${TRAIN[@]}" --out "$WORK/kill" >"$LOG" 2>&1 &
job=$!
while [ ! -f "$WORK/kill/checkpoints/step-00000002/manifest.json" ] && [ $((SECONDS - t0)) -lt "$MPI_TEST_LIMIT" ]; do sleep 0.2; done
# A rank: a child of this job's mpirun (not any other glm on the machine).
launcher=$(pgrep -P "$job" -x mpirun | head -n 1)
victim=$([ -n "$launcher" ] && pgrep -P "$launcher" -x glm | tail -n 1)
[ -n "$victim" ] && kill -9 "$victim"
wait "$job"; rc=$?
secs=$((SECONDS - t0))
if [ -z "$victim" ]; then
  fail "$name" "no checkpoint after ${secs} s (no rank to kill)"
elif [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || [ "$secs" -ge "$MPI_TEST_LIMIT" ]; then
  fail "$name" "mpirun exited $rc after ${secs} s"
elif ! grep -Eq "exited on signal 9|Killed|timed out" "$LOG"; then
  fail "$name" "exited $rc without naming the dead rank"
else
  run_mpi "$name (resume)" 2 "$GLM" "${TRAIN[@]}" --out "$WORK/kill" --resume --stop-at 4
  expect_lines "$name: resumed" 1 "resumed at step [0-9]+"
fi

total=$((passed + failed))
if [ "$failed" -eq 0 ]; then
  echo "mpi-tests: $passed/$total passed"
else
  echo "mpi-tests: $failed of $total FAILED: ${failures[*]}"
  exit 1
fi
