#!/usr/bin/env bash
# Tensor-parallel inference under mpirun: `glm generate|fill --tp N` as N MPI processes must print
# exactly what the one-process run prints (a training checkpoint, INT4 and INT8 files; greedy,
# blanks, beams, a seeded sample), once; `glm eval --tp 2` the one-process scores; a wrong world
# size and a degree that does not divide the model end the job with their message.
# Needs OpenMPI and libclang (Debian: libopenmpi-dev openmpi-bin libclang-dev).
#
# Add a test with one line:
#   same_as_single NAME NP ARGS...          passes if `mpirun -np NP glm ARGS --tp NP` prints (stdout)
#                                           exactly what `glm ARGS` prints, within $MPI_TEST_LIMIT s
#   run_mpi_fails NAME NP REGEX ARGS...     passes if `mpirun -np NP glm ARGS` exits non-zero within
#                                           the limit and its output matches REGEX (grep -E)
# Exits non-zero if any test failed; the last line is the summary.
set -uo pipefail
cd "$(dirname "$0")/.."

MPI_TEST_LIMIT=${MPI_TEST_LIMIT:-120}
# Root in containers, more ranks than cores: both refused by OpenMPI unless asked for.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1

passed=0
failed=0
failures=()
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
OUT=$WORK/out ERR=$WORK/err WANT=$WORK/want

pass() { passed=$((passed + 1)); echo "ok   $1"; }
fail() {
  failed=$((failed + 1)); failures+=("$1"); echo "FAIL $1: $2"
  for f in "$OUT" "$ERR"; do [ -f "$f" ] && sed 's/^/     | /' "$f" | tail -n 20; done
}

# mpirun with a hard time limit; sets $rc, $secs and $hung; stdout in $OUT, stderr in $ERR.
mpi_exec() {
  local np=$1; shift
  local t0=$SECONDS
  timeout --kill-after=10 "$MPI_TEST_LIMIT" mpirun --oversubscribe -np "$np" "$@" >"$OUT" 2>"$ERR"
  rc=$?
  secs=$((SECONDS - t0))
  hung=0
  if [ "$rc" -eq 124 ] || { [ "$rc" -eq 137 ] && [ "$secs" -ge "$MPI_TEST_LIMIT" ]; }; then hung=1; fi
}

same_as_single() {
  local name=$1 np=$2; shift 2
  if ! "$GLM" "$@" >"$WANT" 2>"$ERR"; then
    fail "$name" "the one-process run failed"; return
  fi
  mpi_exec "$np" "$GLM" "$@" --tp "$np"
  if [ "$hung" -eq 1 ]; then
    fail "$name" "hung: killed after ${MPI_TEST_LIMIT} s"
  elif [ "$rc" -ne 0 ]; then
    fail "$name" "mpirun exited with $rc after ${secs} s"
  elif [ ! -s "$WANT" ]; then
    fail "$name" "the one-process run printed nothing"
  elif ! cmp -s "$WANT" "$OUT"; then
    fail "$name" "printed something else than the one-process run: $(diff "$WANT" "$OUT" | head -n 6 | tr '\n' ' ')"
  else
    pass "$name (${secs} s): $(head -c 70 "$OUT" | tr '\n' ' ')"
  fi
}

run_mpi_fails() {
  local name=$1 np=$2 regex=$3; shift 3
  mpi_exec "$np" "$GLM" "$@"
  if [ "$hung" -eq 1 ]; then
    fail "$name" "hung: killed after ${MPI_TEST_LIMIT} s"
  elif [ "$rc" -eq 0 ]; then
    fail "$name" "mpirun exited 0, a failure was expected"
  elif ! cat "$OUT" "$ERR" | grep -Eq "$regex"; then
    fail "$name" "exited with $rc but the output does not match /$regex/"
  else
    pass "$name (exit $rc after ${secs} s)"
  fi
}

command -v mpirun >/dev/null || { echo "mpi-infer-tests: mpirun not found (apt-get install libopenmpi-dev openmpi-bin libclang-dev)"; exit 1; }
echo "mpi-infer-tests: building (cargo build --release -p glm-cli --features mpi)"
cargo build --release -p glm-cli --features mpi || { echo "mpi-infer-tests: build failed"; exit 1; }
GLM=${CARGO_TARGET_DIR:-target}/release/glm

# A tiny model trained for two steps, and its INT4 and INT8 files.
printf 'max_steps = 2\n[objective]\nseq_len = 64\n[batch]\nmicro_batch = 2\nglobal = 2\nramp_start = 2\n[eval]\nevery = 0\nrows = 2\n' >"$WORK/t.toml"
"$GLM" train --config "$WORK/t.toml" --out "$WORK/run" --quiet --no-samples >/dev/null 2>"$ERR" &&
  "$GLM" quantize --bits 4 "$WORK/run/checkpoints/step-00000002" "$WORK/int4.safetensors" 2>>"$ERR" &&
  "$GLM" quantize --bits 8 "$WORK/run/checkpoints/step-00000002" "$WORK/int8.safetensors" 2>>"$ERR" ||
  { cat "$ERR"; echo "mpi-infer-tests: could not make the test model"; exit 1; }
CKPT=$WORK/run/checkpoints/step-00000002

GREEDY=(generate --greedy --max-tokens 8 --json)
same_as_single "generate, training checkpoint, tp 2" 2 "${GREEDY[@]}" --model "$CKPT" "The whale swam"
same_as_single "generate, training checkpoint, tp 4" 4 "${GREEDY[@]}" --model "$CKPT" "The whale swam"
same_as_single "generate, INT4 file, tp 2" 2 "${GREEDY[@]}" --model "$WORK/int4.safetensors" "The whale swam"
same_as_single "generate, INT4 file, tp 4" 4 "${GREEDY[@]}" --model "$WORK/int4.safetensors" "The whale swam"
same_as_single "generate, INT8 file, beams, tp 2" 2 generate --beams 3 --max-tokens 6 --model "$WORK/int8.safetensors" "Hello"
same_as_single "generate, seeded sample, streamed, tp 2" 2 generate --seed 7 --max-tokens 8 --stream --model "$CKPT" "Hello"
same_as_single "generate, INT4 file, seeded sample, tp 4" 4 generate --seed 3 --max-tokens 10 --model "$WORK/int4.safetensors" \
  "The sea"
same_as_single "fill, INT4 file, tp 2" 2 fill --greedy --min-tokens 1 --max-tokens 4 --model "$WORK/int4.safetensors" \
  "The [MASK] sat on the [MASK]."

# An evaluation: the same report table (multiple choice and language modelling): the same rows,
# accuracies exactly, perplexities and bits per byte to f32 rounding (the ranks sum partial
# products in another order than one process).
mkdir -p "$WORK/data/mc" "$WORK/data/lm" "$WORK/tasks"
for i in 0 1 2 3 4 5; do
  printf '{"inputs_pretokenized": "Question %d: the sky is", "choices_pretokenized": ["blue", "red", "green"], "label": %d}\n' "$i" $((i % 3))
done >"$WORK/data/mc/x.jsonl"
printf '{"text": "The sea is wide and the river is long, and the whale swims."}\n' >"$WORK/data/lm/en.jsonl"
printf 'name: mc\ntype: mul\npath: mc\nfile-pattern: "*.jsonl"\n' >"$WORK/tasks/mc.yaml"
printf 'name: lm\ntype: lm\npath: lm\ngeneration_length: 8\n' >"$WORK/tasks/lm.yaml"
EVAL=(eval --model "$WORK/int4.safetensors" --tasks "$WORK/tasks" --data-root "$WORK/data" --quiet)
# Rows `| task | group | metric | value | examples |` of two tables: the same but for values within
# 1e-5 relative (Accuracy rows exactly); prints the first difference.
tables_agree() {
  paste -d '\n' <(grep '^| [a-z]' "$1") <(grep '^| [a-z]' "$2") | awk -F'|' '
    NR % 2 == 1 { a = $0; split($0, x, "|"); next }
    { split($0, y, "|")
      if (x[2] != y[2] || x[3] != y[3] || x[4] != y[4] || x[6] != y[6]) { print "row differs: " a " / " $0; bad = 1; exit }
      u = x[5] + 0; v = y[5] + 0; d = u - v; if (d < 0) d = -d; m = u < 0 ? -u : u
      if (x[4] ~ /Accuracy/ ? x[5] != y[5] : d > 1e-5 * m) { print "value differs: " a " / " $0; bad = 1; exit }
      rows++ }
    END { if (!bad && rows < 4) { print "only " rows " rows"; bad = 1 } exit bad }'
}
name="eval, INT4 file, tp 2: the one-process scores"
if ! "$GLM" "${EVAL[@]}" --out "$WORK/one.json" >"$WANT" 2>"$ERR"; then
  fail "$name" "the one-process run failed"
else
  mpi_exec 2 "$GLM" "${EVAL[@]}" --out "$WORK/two.json" --tp 2
  if [ "$hung" -eq 1 ] || [ "$rc" -ne 0 ]; then
    fail "$name" "mpirun exited with $rc after ${secs} s"
  elif ! why=$(tables_agree "$WANT" "$OUT"); then
    fail "$name" "the report tables differ: $why"
  elif [ ! -s "$WORK/two.json" ]; then
    fail "$name" "rank 0 wrote no report"
  else
    pass "$name (${secs} s)"
  fi
fi

# Errors end the whole job with their message.
run_mpi_fails "generate: world size must be --tp" 3 "world size 3 does not match the layout: --tp 2 needs 2 ranks" \
  generate --model "$CKPT" --tp 2 "x"
run_mpi_fails "generate: a degree that does not divide the heads" 3 "cannot be split 3 ways: 4 heads" \
  generate --model "$WORK/int4.safetensors" --tp 3 "x"
run_mpi_fails "eval: a degree that does not divide the heads" 3 "cannot be split 3 ways: 4 heads" \
  "${EVAL[@]}" --tp 3

# Serving: `glm serve --tp 2` as 2 MPI processes, rank 0 serving and driving, rank 1 following.
# Starts it in the background and waits for its address (in $BASE); the job's pid is $SERVER.
serve_bg() {
  rm -f "$WORK/srv.err"
  timeout --kill-after=10 "$MPI_TEST_LIMIT" mpirun --oversubscribe -np 2 "$GLM" serve --model "$WORK/int4.safetensors" \
    --port 0 --tp 2 "$@" >/dev/null 2>"$WORK/srv.err" &
  SERVER=$!
  BASE=
  for _ in $(seq 1 300); do
    BASE=$(grep -o 'listening on http://[0-9.:]*' "$WORK/srv.err" 2>/dev/null | head -n 1 | cut -d' ' -f3)
    [ -n "$BASE" ] && break
    sleep 0.1
  done
}
completion() { # base, then the JSON body; prints the status and the body
  curl -s -w '\n%{http_code}' -X POST "$1/v1/completions" -H 'Content-Type: application/json' \
    -H 'Authorization: Bearer test-key' -d "$2"
}
rank_pid() { # the pid of MPI rank $1 of the job whose mpirun is a child of $SERVER
  local launcher p
  launcher=$(pgrep -P "$SERVER" -x mpirun | head -n 1)
  for p in $(pgrep -P "$launcher" -x glm); do
    tr '\0' '\n' <"/proc/$p/environ" | grep -qx "OMPI_COMM_WORLD_RANK=$1" && echo "$p"
  done
}

name="serve --tp 2: the one-process answers, and the openai client"
BODY='{"model": "tiny", "prompt": "The whale swam", "max_tokens": 12, "min_tokens": 12, "temperature": 0}'
"$GLM" serve --model "$WORK/int4.safetensors" --port 0 --api-key test-key >/dev/null 2>"$WORK/one.err" &
ONE=$!
for _ in $(seq 1 300); do grep -q 'listening on' "$WORK/one.err" 2>/dev/null && break; sleep 0.1; done
ONE_BASE=$(grep -o 'listening on http://[0-9.:]*' "$WORK/one.err" | head -n 1 | cut -d' ' -f3)
want=$(completion "$ONE_BASE" "$BODY" | head -n 1 | sed 's/"created":[0-9]*,"id":"[^"]*",//')
kill "$ONE"; wait "$ONE" 2>/dev/null
serve_bg --api-key test-key
if [ -z "$BASE" ]; then
  fail "$name" "no address: $(tail -n 3 "$WORK/srv.err" | tr '\n' ' ')"
else
  got=$(completion "$BASE" "$BODY" | head -n 1 | sed 's/"created":[0-9]*,"id":"[^"]*",//')
  client=ok note="openai client not installed (GLM_OPENAI_PYTHON)"
  if [ -n "${GLM_OPENAI_PYTHON:-}" ]; then
    "$GLM_OPENAI_PYTHON" crates/glm-server/tests/e2e/openai_client.py "$BASE" test-key >"$OUT" 2>&1 || client="failed"
    note=$(tail -n 1 "$OUT")
  fi
  # SIGTERM to rank 0 (signalling mpirun makes mpirun itself tear the job down): rank 0 stops
  # serving, tells the follower to stop, and both exit 0.
  kill -TERM "$(rank_pid 0)"; wait "$SERVER"; rc=$?
  if [ "$got" != "$want" ] || [ -z "$want" ]; then
    fail "$name" "answers differ: $got vs one process $want"
  elif [ "$client" != ok ]; then
    fail "$name" "the openai client failed: $(grep 'not ok' "$OUT" | head -n 3 | tr '\n' ' ')"
  elif [ "$rc" -ne 0 ]; then
    fail "$name" "SIGTERM to rank 0: the job exited $rc, not cleanly: $(tail -n 3 "$WORK/srv.err" | tr '\n' ' ')"
  else
    pass "$name ($note; SIGTERM to rank 0: clean exit)"
  fi
fi

# A follower that stops answering (SIGSTOP) while a stream runs: the stream ends with an error
# event, new requests and /health get 503, and the job exits within the grace period.
name="serve --tp 2: a stuck follower ends the stream with an error, then 503, then the job exits"
serve_bg --dist-timeout 3 --ranks-down-grace 3
if [ -z "$BASE" ]; then
  fail "$name" "no address"
else
  t0=$SECONDS
  curl -sN -X POST "$BASE/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "tiny", "prompt": "Hello", "max_tokens": 400, "min_tokens": 400, "temperature": 0, "stream": true}' \
    >"$WORK/stream" &
  for _ in $(seq 1 500); do [ -s "$WORK/stream" ] && break; sleep 0.01; done
  victim=$(rank_pid 1)
  [ -n "$victim" ] && kill -STOP "$victim"
  wait %curl 2>/dev/null || sleep 8
  after=$(completion "$BASE" '{"model": "tiny", "prompt": "Hello", "max_tokens": 2}' | tail -n 1)
  health=$(curl -s -o /dev/null -w '%{http_code}' "$BASE/health")
  wait "$SERVER"; rc=$?
  secs=$((SECONDS - t0))
  [ -n "$victim" ] && kill -CONT "$victim" 2>/dev/null
  if [ -z "$victim" ]; then
    fail "$name" "no rank 1 to stop"
  elif ! grep -q '"error"' "$WORK/stream" || ! tail -c 20 "$WORK/stream" | grep -q 'DONE'; then
    fail "$name" "the stream did not end with an error event: $(tail -c 300 "$WORK/stream")"
  elif [ "$after" != 503 ] || [ "$health" != 503 ]; then
    fail "$name" "after the failure: completions $after, health $health (503 wanted)"
  elif [ "$rc" -eq 0 ] || [ "$secs" -ge "$MPI_TEST_LIMIT" ]; then
    fail "$name" "the job exited $rc after $secs s"
  else
    pass "$name (exit $rc after $secs s)"
  fi
fi

total=$((passed + failed))
if [ "$failed" -eq 0 ]; then
  echo "mpi-infer-tests: $passed/$total passed"
else
  echo "mpi-infer-tests: $failed of $total FAILED: ${failures[*]}"
  exit 1
fi
