#!/usr/bin/env bash
# The test command (README.md; .ci/run calls exactly this): installs what is missing, then
# checks formatting, lints with clippy (warnings are errors) and runs every test of the
# workspace with real RocksDB, real git and real bubblewrap sandboxes.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
flotilla_install_dependencies
flotilla_build_environment
start=$(date +%s)
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked 2>&1 | tee /tmp/flotilla-test.log
passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' /tmp/flotilla-test.log | awk '{s+=$4} END {print s+0}')
echo "flotilla tests: ${passed} passed in $(( $(date +%s) - start )) s"
