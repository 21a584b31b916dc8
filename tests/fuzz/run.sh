#!/usr/bin/env bash
# Runs each libFuzzer target for a fixed time (make fuzz FUZZ_SECONDS=N).
#   tests/fuzz/run.sh BUILD_DIR SECONDS TARGET...
# Each target works on its own corpus copy, build/fuzz/corpus/<target>/, and
# reads the committed seeds of tests/fuzz/<target>/ (new inputs are written
# only to the working corpus).  A crash (or a broken invariant) leaves its
# input in build/fuzz/artifacts/<target>/ and fails the run; to replay it:
#   build/fuzz/<target> build/fuzz/artifacts/<target>/crash-...
set -u
build=$1 seconds=$2
shift 2
cd "$(dirname "$0")/../.."
failed=0
# Stack traces for UBSan reports too (ASan prints them anyway).
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
summary=""
for t in "$@"; do
  corpus=$build/corpus/$t artifacts=$build/artifacts/$t log=$build/$t.log
  mkdir -p "$corpus" "$artifacts"
  dict=()
  [ -f "tests/fuzz/$t.dict" ] && dict=(-dict="tests/fuzz/$t.dict")
  # -timeout: an input taking 10 s is a hang; -rss_limit_mb bounds memory on
  # a shared machine; one worker (the machine has few cores).
  "$build/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="$artifacts/" "${dict[@]}" "$corpus" "tests/fuzz/$t" >"$log" 2>&1
  rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  files=$(find "$corpus" -type f | wc -l)
  if [ $rc -eq 0 ]; then result=ok; else result="FAILED (rc $rc, see $log)"; failed=1; fi
  line=$(printf '%-20s %12s execs %8s/s %6s corpus files  %s' "$t" "${execs:-?}" "${rate:-?}" "$files" "$result")
  echo "fuzz: $line"
  summary="$summary$line"$'\n'
  if [ $rc -ne 0 ]; then grep -E "ERROR|invariant|SUMMARY|Test unit written" "$log" | head -20; fi
done
printf '\nfuzz summary (%s s per target):\n%s' "$seconds" "$summary"
exit $failed
