#!/usr/bin/env bash
# The test command (README.md; .ci/run calls exactly this): installs what is missing, then
# checks formatting, lints with clippy (warnings are errors) and runs every test of the
# workspace with real RocksDB, real git and real bubblewrap sandboxes (and one Python gRPC
# client, from the virtual environment that env.sh makes).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
flotilla_install_dependencies
flotilla_install_python_test_packages
flotilla_build_environment
start=$(date +%s)
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
echo "flotilla test command took $(( $(date +%s) - start )) s"
echo "flotilla: ${passed} passed, 0 failed"
