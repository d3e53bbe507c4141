#!/usr/bin/env bash
# Prints a short hash of everything the binary is built from (src/, Cargo.toml, Cargo.lock,
# build.rs if any). scripts/cuda/pack-gpu-carry.sh stores it beside the carried binary and
# scripts/gpu/gpu.sh compares it with the tree it runs in, so a stale carried build is named as
# such instead of being measured as the current code. Needs no git (the device copy has none).
set -euo pipefail
cd "$(dirname "$0")/../.."
{ find src -type f; ls Cargo.toml Cargo.lock build.rs 2>/dev/null; } | LC_ALL=C sort |
  xargs sha256sum | sha256sum | cut -c1-16
