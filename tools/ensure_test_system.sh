#!/usr/bin/env bash
# The system packages the test suite needs beside the pip ones (run by `make test` before pytest):
#   chromium + chromium-driver   tests/serve/test_browser.py drives the page in a real headless browser
#   postgresql-15 (server bins)  tests/serve/test_postgres.py starts a throwaway PostgreSQL 15 with initdb/pg_ctl
# Idempotent and quick when everything is present. Installs what is missing with apt-get (Debian/Ubuntu) when
# run as root; otherwise prints the command to run and exits 1.
set -euo pipefail

PG_INITDB="${WAN_TEST_PG_BINDIR:-/usr/lib/postgresql/15/bin}/initdb"  # the folder tests/serve/conftest.py uses

# The Debian packages of what is not there yet.
check_missing() {
    missing=()
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
    [ -x "$PG_INITDB" ] || missing+=(postgresql-15)
}

check_missing
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure_test_system: missing system packages: ${missing[*]}" >&2
    echo "ensure_test_system: install them as root: apt-get install -y ${missing[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_test_system: missing ${missing[*]} and no apt-get here; install them with your package manager" >&2
    exit 1
fi

echo "ensure_test_system: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null

check_missing
if [ ${#missing[@]} -ne 0 ]; then
    echo "ensure_test_system: still missing after apt-get install: ${missing[*]} (initdb looked for at $PG_INITDB)" >&2
    exit 1
fi
