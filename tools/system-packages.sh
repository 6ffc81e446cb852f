#!/usr/bin/env bash
# Install, with apt, the Debian packages a target's tests drive, when this user can (root, or sudo without a
# password); otherwise say what is missing and go on: those tests then skip with the reason (in CI, where
# STOPCHURN_REQUIRE_* is set, they fail instead).
#
#   tools/system-packages.sh test     PostgreSQL and MariaDB servers, mysqlclient's build packages, chromium, Java
#   tools/system-packages.sh deploy   PostgreSQL and redis-server (make test-deploy)
#   tools/system-packages.sh mysql    mysqlclient's build packages (make venv-mysql)
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

missing=()
want() {  # want <package>...: add the packages to the missing list
  missing+=("$@")
}
postgres() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || have initdb || want postgresql; }
mysql_build() {
  { have mysql_config || pkg-config --exists mysqlclient 2>/dev/null; } || want default-libmysqlclient-dev pkg-config build-essential
}

for group in "$@"; do
  case "$group" in
    test)
      postgres
      have mariadbd || want mariadb-server
      mysql_build
      [ -x /usr/bin/chromium ] || want chromium
      have java || want openjdk-17-jre-headless  # pyspark's local mode (the warehouse diff's Spark tests)
      ;;
    deploy)
      postgres
      have redis-server || want redis-server
      ;;
    mysql) mysql_build ;;
    *) echo "tools/system-packages.sh: unknown group '$group' (test, deploy, mysql)" >&2; exit 2 ;;
  esac
done

[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if ! command -v apt-get >/dev/null; then
  echo "Not installed (no apt-get here): ${missing[*]}; the tests that need them skip."
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "Not installed (needs root or passwordless sudo): apt-get install ${missing[*]}; the tests that need them skip."
  exit 0
fi
echo "Installing with apt: ${missing[*]}"
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
