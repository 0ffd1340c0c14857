#!/usr/bin/env bash
# Set up this checkout on a fresh Debian machine:
#   - system packages cnn-mellin needs (espeak-ng for the synthetic corpus),
#   - with --databases: PostgreSQL and MariaDB running on 127.0.0.1 (installed from Debian
#     packages when missing) for the live database tests,
#   - with --test-deps: those databases plus Debian's chromium and chromium-driver, which the
#     browser tests (report page, optuna-dashboard) and the report's PNG export drive, and a
#     single-node SLURM cluster for the cluster tests (scripts/slurm_local.sh start),
#   - a virtual environment in .venv with cnn-mellin installed (editable) and its dev tools.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

want_databases=0
want_browser=0
want_slurm=0
for arg in "$@"; do
  case "$arg" in
    --databases) want_databases=1 ;;
    --test-deps) want_databases=1; want_browser=1; want_slurm=1 ;;
    *) echo "usage: scripts/setup.sh [--databases] [--test-deps]" >&2; exit 2 ;;
  esac
done

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# espeak-ng speaks the synthetic corpus; libespeak-ng1 gives us its phoneme timing.
if ! ldconfig -p | grep -q 'libespeak-ng\.so' || ! command -v espeak-ng >/dev/null; then
  echo "setup: installing espeak-ng" >&2
  apt_install espeak-ng libespeak-ng1
fi

if [ "$want_browser" -eq 1 ] && { ! command -v chromium >/dev/null \
    || ! command -v chromedriver >/dev/null; }; then
  echo "setup: installing chromium and chromium-driver" >&2
  apt_install chromium chromium-driver
fi

if [ "$want_databases" -eq 1 ]; then
  # PostgreSQL: trust auth for user postgres on 127.0.0.1:5432.
  if ! command -v pg_ctlcluster >/dev/null; then
    echo "setup: installing PostgreSQL" >&2
    apt_install postgresql
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
      as_root sed -i -E 's/^(host\s+all\s+all\s+127\.0\.0\.1\/32\s+)\S+/\1trust/' "$hba"
      as_root sed -i -E 's/^(local\s+all\s+postgres\s+)\S+/\1trust/' "$hba"
    done
  fi
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "setup: starting PostgreSQL" >&2
    for version in $(ls /etc/postgresql); do
      as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
  # MariaDB: root with an empty password on 127.0.0.1:3306.
  if ! command -v mariadbd >/dev/null && [ ! -x /usr/sbin/mariadbd ]; then
    echo "setup: installing MariaDB" >&2
    apt_install mariadb-server
    fresh_mariadb=1
  else
    fresh_mariadb=0
  fi
  if ! mariadb-admin -h 127.0.0.1 -u root ping >/dev/null 2>&1; then
    echo "setup: starting MariaDB" >&2
    as_root mkdir -p /run/mysqld && as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
    as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    for _ in $(seq 30); do mariadb-admin -u root ping >/dev/null 2>&1 && break; sleep 1; done
  fi
  if [ "$fresh_mariadb" -eq 1 ]; then
    as_root mariadb -u root -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD(''); CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY ''; GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION; FLUSH PRIVILEGES;"
  fi
fi

if [ "$want_slurm" -eq 1 ]; then
  # the cluster tests skip (saying so) when it cannot start, e.g. without root
  bash scripts/slurm_local.sh start || echo "setup: no local SLURM; its tests will skip" >&2
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import cnn_mellin, torch, torchaudio, optuna" 2>/dev/null \
    || [ setup.py -nt .venv/.cnn-mellin-installed ]; then
  echo "setup: installing cnn-mellin and its dependencies into .venv (torch is ~4.6 GB)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch .venv/.cnn-mellin-installed
fi
echo "setup: done (.venv ready)" >&2
