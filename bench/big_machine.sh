#!/usr/bin/env bash
# Every figure the multi-core bars of docs/performance.md name, in one run of about five minutes, on
# the machine it runs on (meant for one with many cores; on two cores it runs, slowly, and says so):
#   1. three nodes beside a three-member etcd, single-value tokenize at c=64 (two alternating rounds)
#      and c=256 (one round), with 100-value batches after each, p50/p99 and CPU per request;
#   2. one node with W = 1, 2, 4, 8 HTTP workers, fresh single-value tokenize, CPU per process kind;
#   3. one node at its default W: fresh, repeat and detokenize side by side, single values and batches.
# Every number is printed by bench/loadgen.py; nothing here judges them.
#
#   bench/big_machine.sh     # python3 with the project's dependencies importable, etcd on PATH
#
# Settings (environment): PYTHON (python3), DURATION (8 s measured), WARMUP (2 s), CLIENT_PROCESSES
# (load-generator processes, default a quarter of the cores, at least 1), NODE_WORKERS (HTTP workers
# per node when three nodes share the machine, default a third of the cores minus one, at least 1),
# TOKENVAULT_TLS (false: plain HTTP on both sides; true: TLS on both, etcd's client and peer links
# included, so either way the comparison is like for like).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
duration=${DURATION:-8}
warmup=${WARMUP:-2}
cores=$(nproc)
client_processes=${CLIENT_PROCESSES:-$(( cores / 4 > 0 ? cores / 4 : 1 ))}
node_workers=${NODE_WORKERS:-$(( cores / 3 - 1 > 0 ? cores / 3 - 1 : 1 ))}
export TOKENVAULT_TLS=${TOKENVAULT_TLS:-false}
loadgen=("$python" bench/loadgen.py)
common=(--duration "$duration" --warmup "$warmup" --client raw --client-processes "$client_processes")

echo "== machine: $cores cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)), \
$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $("$python" --version 2>&1), \
commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), TLS $TOKENVAULT_TLS, \
$client_processes load-generator processes, $node_workers workers per node of three"
if [ "$cores" -lt 8 ]; then
    echo "   (only $cores cores: the nodes, etcd and the load generator share them; the figures are not the bar's)"
fi

echo "== 1. three nodes beside etcd, c=64"
"${loadgen[@]}" compare-etcd --workers "$node_workers" --rounds 2 --concurrency 64 "${common[@]}"
echo "== 1. three nodes beside etcd, c=256"
"${loadgen[@]}" compare-etcd --workers "$node_workers" --rounds 1 --concurrency 256 "${common[@]}"

echo "== 2. one node, W = 1, 2, 4, 8, fresh tokenize x1, c=64"
"${loadgen[@]}" workers --counts 1,2,4,8 --mode tokenize --concurrency 64 "${common[@]}"

echo "== 3. one node at its default W (cores - 1): fresh, repeat, detokenize"
default_workers=$(( cores - 1 > 0 ? cores - 1 : 1 ))
for mode in tokenize repeat detokenize; do
    "${loadgen[@]}" workers --counts "$default_workers" --mode "$mode" --concurrency 256 "${common[@]}"
    "${loadgen[@]}" workers --counts "$default_workers" --mode "$mode" --batch 100 --concurrency 64 "${common[@]}"
done
echo "== done"
