# Sourced by scripts/test.sh: system tools some tests use — Chromium (the Prefect UI check), the Debian
# docker-compose (static validation of infra/compose.yaml), PostgreSQL (the Prefect server's database in the
# integration tests and benchmarks/arrivals.py, started by scripts/postgres.sh) and curl (the README's server
# recipe, which a test runs). Installed with apt, one package at a time, when we are root and they are missing;
# otherwise the checks that need them are skipped and say so (under CI=true the PostgreSQL tests fail instead).
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "fedscan: installing ${need[*]} (apt)" >&2
    apt-get update -qq >/dev/null 2>&1 || true
    for pkg in "${need[@]}"; do  # one at a time: a package the mirror lacks does not hold back the others
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1 \
        || echo "fedscan: could not install $pkg; the checks that need it will be skipped" >&2
    done
  else
    echo "fedscan: ${need[*]} missing (not root / no apt); the checks that need them will be skipped" >&2
  fi
fi
