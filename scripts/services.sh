#!/usr/bin/env bash
# Starts, stops or reports the servers gochat's tests and distributed mode use, each on loopback:
# MariaDB (127.0.0.1:3306) and Redis (127.0.0.1:6379). Idempotent: a server that already answers
# is left alone; a missing one is installed from Debian's packages (apt-get, as root) and started.
#
#   scripts/services.sh up       # install if needed, start, wait until each answers
#   scripts/services.sh status   # say what answers
#   scripts/services.sh down     # stop what this script started
#   scripts/services.sh env      # print the variables the tests read (eval "$(... env)")
set -euo pipefail

STATE_DIR="${GOCHAT_STATE_DIR:-$HOME/.cache/gochat/services}"
mkdir -p "$STATE_DIR"
MYSQL_HOST=127.0.0.1
MYSQL_PORT=3306
REDIS_PORT=6379

log() { printf '[services] %s\n' "$*" >&2; }

apt_updated=""
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    log "need root to install $*; install them and retry"; return 1
  fi
  if [ -z "$apt_updated" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

wait_for() { # name, tries, command...
  local name=$1 tries=$2; shift 2
  for _ in $(seq "$tries"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  log "$name did not come up"; return 1
}

# ---------------------------------------------------------------------------------------------
# MariaDB
# ---------------------------------------------------------------------------------------------
mysql_root_tcp() { mariadb -h "$MYSQL_HOST" -P "$MYSQL_PORT" -uroot --connect-timeout=2 -e 'SELECT 1'; }
mysql_gochat_tcp() { mariadb -h "$MYSQL_HOST" -P "$MYSQL_PORT" -ugochat -pgochat --connect-timeout=2 -e 'SELECT 1'; }
mysql_up_any() { mysqladmin -h "$MYSQL_HOST" -P "$MYSQL_PORT" --connect-timeout=2 ping; }

mysql_url() {
  if mysql_root_tcp >/dev/null 2>&1; then
    echo "mysql://root@$MYSQL_HOST:$MYSQL_PORT"
  else
    echo "mysql://gochat:gochat@$MYSQL_HOST:$MYSQL_PORT"
  fi
}

mysql_start() {
  if ! command -v mariadbd >/dev/null 2>&1; then
    log "installing MariaDB"
    apt_install mariadb-server mariadb-client
  fi
  if ! mysql_up_any >/dev/null 2>&1; then
    log "starting MariaDB"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
    touch "$STATE_DIR/mariadb.started"
    wait_for MariaDB 120 mysql_up_any
  fi
  # Tests connect over TCP; Debian's root uses socket auth, so give them their own account.
  if ! mysql_root_tcp >/dev/null 2>&1 && ! mysql_gochat_tcp >/dev/null 2>&1; then
    log "creating the gochat test account"
    mariadb -uroot -e "CREATE USER IF NOT EXISTS 'gochat'@'localhost' IDENTIFIED BY 'gochat';
      CREATE USER IF NOT EXISTS 'gochat'@'127.0.0.1' IDENTIFIED BY 'gochat';
      CREATE USER IF NOT EXISTS 'gochat'@'%' IDENTIFIED BY 'gochat';
      GRANT ALL PRIVILEGES ON *.* TO 'gochat'@'localhost';
      GRANT ALL PRIVILEGES ON *.* TO 'gochat'@'127.0.0.1';
      GRANT ALL PRIVILEGES ON *.* TO 'gochat'@'%';
      FLUSH PRIVILEGES;"
  fi
  wait_for "MariaDB login" 20 sh -c "mariadb -h $MYSQL_HOST -P $MYSQL_PORT -uroot -e 'SELECT 1' || mariadb -h $MYSQL_HOST -P $MYSQL_PORT -ugochat -pgochat -e 'SELECT 1'"
}

mysql_stop() {
  if [ -f "$STATE_DIR/mariadb.started" ]; then
    start-stop-daemon --stop --oknodo --retry 30 --exec /usr/sbin/mariadbd || true
    rm -f "$STATE_DIR/mariadb.started"
  fi
}

# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------
redis_ping() { [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

redis_start() {
  if ! command -v redis-server >/dev/null 2>&1; then
    log "installing Redis"
    apt_install redis-server redis-tools
  fi
  if ! redis_ping; then
    log "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
      --appendonly no --dir /var/lib/redis --logfile /var/log/redis/gochat.log
    touch "$STATE_DIR/redis.started"
    wait_for Redis 60 redis_ping
  fi
}

redis_stop() {
  if [ -f "$STATE_DIR/redis.started" ]; then
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    rm -f "$STATE_DIR/redis.started"
  fi
}

# ---------------------------------------------------------------------------------------------

print_env() {
  echo "export GOCHAT_TEST_MYSQL_URL=$(mysql_url)"
  echo "export GOCHAT_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT"
}

case "${1:-}" in
  up)
    mysql_start
    redis_start
    log "up: MariaDB $(mysql_url | sed 's/:[^:@]*@/:***@/'), Redis 127.0.0.1:$REDIS_PORT"
    ;;
  down)
    redis_stop
    mysql_stop
    ;;
  status)
    if mysql_up_any >/dev/null 2>&1; then echo "mariadb: up"; else echo "mariadb: down"; fi
    if redis_ping; then echo "redis: up"; else echo "redis: down"; fi
    ;;
  env)
    print_env
    ;;
  *)
    echo "usage: $0 up|down|status|env" >&2
    exit 2
    ;;
esac
