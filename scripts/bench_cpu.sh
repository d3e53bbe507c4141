#!/usr/bin/env bash
# CPU benchmarks (criterion): model-independent stages (benches/components.rs) and the tiny
# fixture model (benches/models.rs), then a markdown summary ready for BENCHMARKS.md.
#
#   scripts/bench_cpu.sh                        # everything (~1-3 min on 2 cores)
#   scripts/bench_cpu.sh tiny/                  # only benchmarks whose name contains "tiny/"
#   scripts/bench_cpu.sh --save-baseline main   # any other criterion argument is passed on
#   scripts/bench_cpu.sh --baseline main        #   (compare with a saved baseline)
#
# Criterion keeps the previous run under $CARGO_TARGET_DIR/criterion (default target/criterion)
# and reports the change against it; the summary's last column shows that change with its
# verdict (regressed / improved / noise). Set BENCH_LOG=FILE to keep the raw criterion output.
# Smoke test (each benchmark once, ~5 s): cargo test --release --bench components --bench models
# Needs the fixtures under tests/fixtures (tests/fixtures/models/tiny-w0 and the t2i_64x64 case).
set -euo pipefail
cd "$(dirname "$0")/.."

log="${BENCH_LOG:-$(mktemp)}"
[[ -n "${BENCH_LOG:-}" ]] || trap 'rm -f "$log"' EXIT

cmd=(cargo bench --bench components --bench models)
if (($#)); then cmd+=(-- "$@"); fi
echo "+ ${cmd[*]}" >&2
load0=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')
"${cmd[@]}" | tee "$log"

cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: *//' || true)
echo
echo "## $(date -u '+%Y-%m-%d %H:%M UTC'), $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo
echo "* machine: $(nproc) CPUs, ${cpu:-unknown CPU}; load average before/after: $load0 / $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"
echo "* command: \`scripts/bench_cpu.sh${*:+ $*}\` (\`${cmd[*]}\`)"
echo
# Criterion prints "name  time: [low estimate high]" (the name on its own line when long),
# optionally followed by "change: [low estimate high] (p = ...)" and a verdict line.
LC_ALL=C awk '
function flush() {
    if (name != "" && est != "") {
        n++; row[n] = sprintf("| `%s` | %s | %s | %s | %s |", name, lo, est, hi, chg == "" ? "–" : chg verdict)
    }
    name = ""; est = ""; chg = ""; verdict = ""
}
function bracket(s,   a) { sub(/.*\[/, "", s); sub(/\].*/, "", s); return s }
/^[^ \t]/ && !/^(Found|Benchmarking|Warning|WARNING|Gnuplot|Running|Testing)/ {
    flush(); name = $1
}
/ time: +\[/ {
    split(bracket($0), v, / +/)
    lo = v[1] " " v[2]; est = v[3] " " v[4]; hi = v[5] " " v[6]
}
/ change: +\[/ { split(bracket($0), v, / +/); chg = v[2] }
/Performance has regressed/ { verdict = " (regressed)" }
/Performance has improved/ { verdict = " (improved)" }
/No change in performance detected|Change within noise threshold/ { verdict = " (no change)" }
END {
    flush()
    print "| benchmark | low | estimate | high | change vs previous run |"
    print "|---|---:|---:|---:|---|"
    for (i = 1; i <= n; i++) print row[i]
    print ""
    print "time per iteration, criterion mean with its 95 % confidence interval (10 samples)."
}' "$log"
