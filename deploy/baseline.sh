#!/usr/bin/env bash
# baseline.sh — the quick start fleet's work as a plain shell pipeline, to compare with Flotilla.
#
# Usage: deploy/baseline.sh <directory> [jobs]
#
# For every repository URL in <directory>/repositories.txt (written by
# deploy/prepare-repositories.sh), <jobs> at a time (default: nproc), it does what the fleet
# "enforce rustfmt" does:
#   1. git clone the origin into a fresh temporary directory;
#   2. run the agent command          (default: cargo fmt --all);
#   3. run the verification command   (default: cargo fmt --all -- --check);
#   4. if the agent changed files: commit them on branch baseline/rustfmt and push that branch
#      to the origin (forced, so reruns are idempotent; the fleet's own flotilla/... branches
#      are never touched).
# Commands run offline (CARGO_NET_OFFLINE=true). A repository is "failed" when any step
# fails, "changed" when the agent changed files and everything passed, else "unchanged".
# Each repository's log is kept in <directory>/baseline-logs/<name>.log.
#
# Uses GNU parallel when present (installing it with apt-get when missing and run as root,
# unless BASELINE_INSTALL=0), else xargs -P. The last line printed is
#   baseline: N repositories, X changed, Y unchanged, Z failed, wall_ms=W
# where W covers all the clone/format/check/commit/push work. Exits 1 when any failed.
#
# Environment: BASELINE_AGENT, BASELINE_VERIFY (the two commands, run with bash -c in the
# clone), BASELINE_BRANCH (default baseline/rustfmt), BASELINE_INSTALL (default 1),
# BASELINE_RUNNER=xargs (use xargs -P even when GNU parallel is there).
set -euo pipefail

AGENT="${BASELINE_AGENT:-cargo fmt --all}"
VERIFY="${BASELINE_VERIFY:-cargo fmt --all -- --check}"
BRANCH="${BASELINE_BRANCH:-baseline/rustfmt}"

die() { echo "baseline: error: $*" >&2; exit 2; }
now_ms() { date +%s%3N; }

# Worker mode (internal): baseline.sh --one <url> <run-dir> <log-dir>
# Prints one line: "<changed|unchanged|failed> <name> <ms>".
if [[ "${1:-}" == --one ]]; then
  url="$2" run="$3" logs="$4"
  name="$(basename "${url%/}")"
  name="${name%.git}"
  log="$logs/$name.log"
  start="$(now_ms)"
  work="$(mktemp -d "$run/$name.XXXXXX")"
  status=failed
  export CARGO_NET_OFFLINE=true
  export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null
  export GIT_AUTHOR_NAME="flotilla baseline" GIT_AUTHOR_EMAIL="baseline@flotilla.invalid"
  export GIT_COMMITTER_NAME="flotilla baseline" GIT_COMMITTER_EMAIL="baseline@flotilla.invalid"
  {
    echo "== $url"
    echo "== git clone"
    git clone -q "$url" "$work/repo" &&
      cd "$work/repo" &&
      echo "== agent: $AGENT" && bash -c "$AGENT" &&
      echo "== verify: $VERIFY" && bash -c "$VERIFY" &&
      if [[ -n "$(git status --porcelain)" ]]; then
        git checkout -q -b "$BRANCH" &&
          git add -A &&
          git commit -q --no-verify -m "Format with rustfmt" &&
          git diff --stat HEAD~1 HEAD | tail -1 &&
          echo "== git push origin $BRANCH" &&
          git push -q --force origin "HEAD:refs/heads/$BRANCH" &&
          status=changed
      else
        echo "== no changes"
        status=unchanged
      fi
  } >"$log" 2>&1 || true
  cd "$run"
  rm -rf "$work"
  echo "== $status" >>"$log"
  echo "$status $name $(( $(now_ms) - start ))"
  exit 0
fi

if [[ $# -lt 1 || $# -gt 2 || "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
fi
[[ -d "$1" ]] || die "no directory $1"
root="$(cd "$1" && pwd -P)"
list="$root/repositories.txt"
[[ -s "$list" ]] || die "$list is missing or empty: run deploy/prepare-repositories.sh $1 first"
jobs="${2:-$(nproc)}"
[[ "$jobs" =~ ^[0-9]+$ && "$jobs" -ge 1 ]] || die "jobs must be a positive integer, got '$jobs'"
for tool in git cargo; do
  command -v "$tool" >/dev/null || die "'$tool' not found in PATH"
done
self="$(cd "$(dirname "$0")" && pwd -P)/$(basename "$0")"

runner="xargs"
if [[ "${BASELINE_RUNNER:-}" == xargs ]]; then
  :
elif command -v parallel >/dev/null && parallel --version 2>/dev/null | grep -q 'GNU parallel'; then
  runner=parallel
elif [[ "${BASELINE_INSTALL:-1}" != 0 && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  echo "baseline: installing GNU parallel with apt-get" >&2
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq parallel >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq parallel >/dev/null 2>&1; }; then
    runner=parallel
  else
    echo "baseline: could not install GNU parallel, using xargs -P" >&2
  fi
fi

mapfile -t urls < <(grep -v -e '^[[:space:]]*$' -e '^#' "$list")
run="$(mktemp -d "${TMPDIR:-/tmp}/flotilla-baseline.XXXXXX")"
trap 'rm -rf "$run"' EXIT
logs="$root/baseline-logs"
rm -rf "$logs"
mkdir -p "$logs"
echo "baseline: ${#urls[@]} repositories, $jobs jobs ($runner), agent: $AGENT, verify: $VERIFY" >&2

start="$(now_ms)"
if [[ "$runner" == parallel ]]; then
  printf '%s\n' "${urls[@]}" |
    parallel --will-cite -j "$jobs" -- bash "$self" --one {} "$run" "$logs" >"$run/results"
else
  printf '%s\0' "${urls[@]}" |
    xargs -0 -P "$jobs" -I{} bash "$self" --one {} "$run" "$logs" >"$run/results"
fi
wall_ms=$(( $(now_ms) - start ))

changed="$(grep -c '^changed ' "$run/results" || true)"
unchanged="$(grep -c '^unchanged ' "$run/results" || true)"
failed=$(( ${#urls[@]} - changed - unchanged ))
while read -r status name ms; do
  [[ "$status" == failed ]] && echo "baseline: FAILED $name (${ms} ms), log: $logs/$name.log" >&2
done <"$run/results"
echo "baseline: ${#urls[@]} repositories, $changed changed, $unchanged unchanged, $failed failed, wall_ms=$wall_ms"
(( failed == 0 )) || exit 1
