# Sourced by scripts/test.sh: system tools some tests use — Chromium (the Prefect UI check), the Debian
# docker-compose (static validation of infra/compose.yaml) and PostgreSQL (the Prefect server's database in the
# integration tests and benchmarks/arrivals.py, started by scripts/postgres.sh). Installed with apt when we are
# root and they are missing; otherwise those checks are skipped and say so (under CI=true the PostgreSQL tests fail).
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "fedscan: installing ${need[*]} (apt)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}") \
      >/dev/null 2>&1 || echo "fedscan: could not install ${need[*]}; the checks that need them will be skipped" >&2
  else
    echo "fedscan: ${need[*]} missing (not root / no apt); the checks that need them will be skipped" >&2
  fi
fi
