#!/usr/bin/env bash
# The whole test suite, as README and CI run it: set up whatever is missing
# (scripts/setup.sh is idempotent and quick when all is there), then pytest.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m "not vm"`).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO/scripts/setup.sh"
cd "$REPO"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
    echo "test: pytest collected no tests: that is a failure, not a pass" >&2
fi
exit "$rc"
