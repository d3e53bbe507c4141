#!/usr/bin/env bash
# Throughput and latency of `flux2-klein serve` at 1, 4 and 16 concurrent clients, against
# the CLI's own batch (`generate --prompt-file`, one process) for the same images. Prints
# Markdown rows ready for BENCHMARKS.md.
#
#   scripts/bench-serve.sh [MODEL] [SIZE] [STEPS] [REQUESTS]
#   scripts/bench-serve.sh                                   # tiny-w0, 64x64, 2 steps, 32 requests
#   scripts/bench-serve.sh ./klein-4b 1024 4 16
#
# Builds nothing: it runs target/release/flux2-klein (`cargo build --release` first; set
# FLUX2_KLEIN_BIN to run another build). Each request is one image of a distinct seed; a
# request's latency is curl's time_total (queueing included); images/s is REQUESTS over the
# wall time of the whole run. Model options for both serve and generate (a device, --dtype,
# ...) can be given in BENCH_ARGS, e.g. BENCH_ARGS="--device cuda:0 --dtype bf16".
# DISTINCT_PROMPTS=1 gives every request its own prompt ("…, variation SEED"): the text
# encoder then runs for every image on both sides (with one prompt, the images of a batch
# share its embedding). Needs bash, curl, awk, sort and xargs (and date, sleep, mktemp).
set -euo pipefail

# Paths given relative to the caller's directory stay valid after the cd below (a model that
# is not a path is a hub repo id, left as it is).
absolute() { if [[ -e $1 && $1 != /* ]]; then echo "$PWD/$1"; else echo "$1"; fi; }
model=$(absolute "${1:-tests/fixtures/models/tiny-w0}")
bin=$(absolute "${FLUX2_KLEIN_BIN:-target/release/flux2-klein}")
size=${2:-64}
steps=${3:-2}
requests=${4:-32}
read -r -a extra_args <<<"${BENCH_ARGS:-}"
cd "$(dirname "$0")/.."
prompt="a red fox in the snow"

if [[ ! -x $bin ]]; then
    echo "error: $bin is not built — run \`cargo build --release\` first (or set FLUX2_KLEIN_BIN)" >&2
    exit 1
fi
for n in "$size" "$steps" "$requests"; do
    if [[ ! $n =~ ^[1-9][0-9]*$ ]]; then
        echo "error: SIZE, STEPS and REQUESTS must be positive integers, got '$n'" >&2
        exit 2
    fi
done

work=$(mktemp -d)
server_pid=
stop_server() {
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=
    fi
}
trap 'stop_server; rm -rf "$work"' EXIT

# The queue holds every request of a run, so that none gets 429 and each is timed.
queue=$((requests > 64 ? requests : 64))
: >"$work/stdout"
"$bin" -q serve -m "$model" --port 0 --max-queue "$queue" ${extra_args[@]+"${extra_args[@]}"} \
    >"$work/stdout" 2>"$work/stderr" &
server_pid=$!

# Stops the benchmark, with the server's log, when the server has exited ($1: when).
exit_if_gone() {
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "error: the server exited $1:" >&2
        printf '%s\n' "$(<"$work/stderr")" >&2
        exit 1
    fi
}

# The first stdout line is "listening on http://127.0.0.1:PORT" (printed once bound; `read`
# succeeds only on a whole line, so a half-written port is never taken).
line=
for ((i = 0; i < 1200; i++)); do
    if read -r line <"$work/stdout"; then
        break
    fi
    line=
    exit_if_gone "before listening"
    sleep 0.1
done
if [[ $line != listening\ on\ http://*:* ]]; then
    echo "error: no \"listening on\" line from the server after 120 s (got '$line')" >&2
    exit 1
fi
base=${line#listening on }
base=${base%%[[:space:]]*}

# Ready once /health is 200 (503 while the models load and warm).
ready=
for ((i = 0; i < 6000; i++)); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$base/health" || true)
    if [[ $code == 200 ]]; then
        ready=1
        break
    fi
    exit_if_gone "while loading"
    sleep 0.1
done
if [[ -z $ready ]]; then
    echo "error: the server was not ready after 600 s" >&2
    exit 1
fi

now() { date +%s.%N; }
distinct=${DISTINCT_PROMPTS:-0}
# The prompt of the request with seed $1.
prompt_of() { if [[ $distinct == 1 ]]; then echo "$prompt, variation $1"; else echo "$prompt"; fi; }

# One request, for xargs: prints "HTTP_CODE TIME_TOTAL" (code 000 when curl got no answer;
# counted below rather than stopping xargs).
request() {
    curl -s -o /dev/null -w '%{http_code} %{time_total}\n' \
        -H 'Content-Type: application/json' \
        -d "{\"prompt\": \"$(prompt_of "$1")\", \"size\": \"${size}x${size}\", \"steps\": $steps, \"seed\": $1}" \
        "$base/v1/images/generations" || true
}
export -f request prompt_of
export prompt size steps base distinct

# An untimed request first (the server is warm, but the client side and caches are not).
request 0 >/dev/null

echo "serve: $model, ${size}x${size}, $steps steps, $requests requests of one image each, $([[ $distinct == 1 ]] && echo "a prompt each" || echo "one prompt")"
echo
echo "| clients | images/s | p50 latency (ms) | p99 latency (ms) |"
echo "|--:|--:|--:|--:|"
for clients in 1 4 16; do
    # Distinct seeds in every run (and across runs).
    first=$((clients * 100000))
    t0=$(now)
    for ((k = 0; k < requests; k++)); do echo $((first + k)); done |
        xargs -P "$clients" -I{} bash -c 'request "$1"' _ {} >"$work/times-$clients"
    t1=$(now)
    failed=$(awk '$1 != 200 { n++ } END { print n + 0 }' "$work/times-$clients")
    if ((failed > 0)); then
        echo "error: $failed of $requests requests at $clients clients did not get 200:" >&2
        awk '$1 != 200 { c[$1]++ } END { for (k in c) print "  HTTP " k ": " c[k] }' \
            "$work/times-$clients" >&2
        exit 1
    fi
    # Nearest-rank percentiles of the sorted latencies.
    awk '{ print $2 }' "$work/times-$clients" | sort -n >"$work/sorted-$clients"
    awk -v clients="$clients" -v n="$requests" -v t0="$t0" -v t1="$t1" '
        { t[NR] = $1 }
        END {
            i50 = int((NR * 50 + 99) / 100); if (i50 < 1) i50 = 1
            i99 = int((NR * 99 + 99) / 100); if (i99 < 1) i99 = 1
            printf "| %d | %.2f | %.0f | %.0f |\n", clients, n / (t1 - t0), t[i50] * 1000, t[i99] * 1000
        }' "$work/sorted-$clients"
done

# The CLI baseline runs alone: the server would compete for the same cores.
stop_server

for ((k = 0; k < requests; k++)); do
    echo "{\"prompt\": \"$(prompt_of $((k + 1)))\", \"seed\": $((k + 1))}"
done >"$work/prompts.txt"
mkdir -p "$work/cli"
t0=$(now)
"$bin" -q generate -m "$model" --prompt-file "$work/prompts.txt" -W "$size" -H "$size" \
    --steps "$steps" -o "$work/cli/{index}.png" ${extra_args[@]+"${extra_args[@]}"} >/dev/null
t1=$(now)
echo
awk -v n="$requests" -v t0="$t0" -v t1="$t1" 'BEGIN {
    printf "CLI batch (`generate --prompt-file`, %d lines, one process, model load included): %.2f images/s (%.1f s)\n", n, n / (t1 - t0), t1 - t0
}'
