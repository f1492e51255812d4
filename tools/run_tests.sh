#!/usr/bin/env bash
# Install what the project needs (tools/setup_env.sh) and run the whole test suite.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -k foundation`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/tools/setup_env.sh"
cd "$root"
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: the suite is broken" >&2
  exit 1
fi
exit "$rc"
