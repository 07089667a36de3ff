#!/usr/bin/env bash
# Starts, stops or reports the servers gochat's tests and distributed mode use, each on loopback:
# MariaDB (127.0.0.1:3306), Redis (127.0.0.1:6379), etcd (127.0.0.1:2379, peer 2380) and tansu, a
# Kafka-compatible broker with in-memory storage for the tests (127.0.0.1:9092; production uses
# Apache Kafka). Idempotent: a server that already answers is left alone; a missing one is
# installed (Debian's packages through apt-get as root; tansu with `cargo install` into
# ~/.cache/gochat/tools, which takes several minutes once) and started.
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
ETCD_CLIENT_URL=http://127.0.0.1:2379
ETCD_PEER_URL=http://127.0.0.1:2380
KAFKA_HOST=127.0.0.1
KAFKA_PORT=9092
TOOLS_DIR="${GOCHAT_TOOLS_DIR:-$HOME/.cache/gochat/tools}"
TANSU="$TOOLS_DIR/bin/tansu"

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
# Background servers started by this script: pid in $STATE_DIR/NAME.pid, log in $STATE_DIR/NAME.log
# ---------------------------------------------------------------------------------------------
stop_started() { # name
  local pid
  pid=$(cat "$STATE_DIR/$1.pid" 2>/dev/null) || return 0
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$STATE_DIR/$1.pid"
}

# ---------------------------------------------------------------------------------------------
# etcd
# ---------------------------------------------------------------------------------------------
etcd_health() { curl -fsS -m 2 "$ETCD_CLIENT_URL/health" 2>/dev/null | grep -q '"health":"true"'; }

etcd_start() {
  if etcd_health; then return 0; fi
  if ! command -v etcd >/dev/null 2>&1; then
    log "installing etcd"
    apt_install etcd-server etcd-client
  fi
  log "starting etcd"
  mkdir -p "$STATE_DIR/etcd"
  # etcd refuses architectures other than amd64/arm64/ppc64le unless this variable names them.
  ETCD_UNSUPPORTED_ARCH="$(dpkg --print-architecture 2>/dev/null || echo amd64)" \
    setsid nohup etcd --name gochat --data-dir "$STATE_DIR/etcd" \
    --listen-client-urls "$ETCD_CLIENT_URL" --advertise-client-urls "$ETCD_CLIENT_URL" \
    --listen-peer-urls "$ETCD_PEER_URL" --initial-advertise-peer-urls "$ETCD_PEER_URL" \
    --initial-cluster "gochat=$ETCD_PEER_URL" \
    >>"$STATE_DIR/etcd.log" 2>&1 </dev/null &
  echo $! >"$STATE_DIR/etcd.pid"
  if ! wait_for etcd 60 etcd_health; then
    tail -n 20 "$STATE_DIR/etcd.log" >&2 || true; return 1
  fi
}

etcd_stop() { stop_started etcd; }

# ---------------------------------------------------------------------------------------------
# tansu (Kafka-compatible broker, in-memory storage; tests only)
# ---------------------------------------------------------------------------------------------
kafka_port_open() { (exec 3<>"/dev/tcp/$KAFKA_HOST/$KAFKA_PORT") 2>/dev/null; }
# A metadata round trip, when tansu's client is at hand; else the port answering is enough.
kafka_ready() {
  kafka_port_open || return 1
  if [ -x "$TANSU" ]; then
    timeout 10 "$TANSU" topic list --broker "tcp://$KAFKA_HOST:$KAFKA_PORT" >/dev/null 2>&1
  fi
}

tansu_install() {
  if [ -x "$TANSU" ]; then return 0; fi
  if ! command -v cargo >/dev/null 2>&1; then
    log "tansu is missing and cargo is not installed; install Rust and retry"; return 1
  fi
  log "installing tansu into $TOOLS_DIR (cargo install; this takes 8+ minutes the first time)"
  CARGO_TARGET_DIR="$HOME/.cache/gochat/tansu-target" \
    cargo install tansu --locked --features dynostore --root "$TOOLS_DIR" >&2
}

tansu_start() {
  if kafka_port_open; then
    wait_for "Kafka broker metadata" 20 kafka_ready
    return
  fi
  tansu_install
  log "starting tansu on $KAFKA_HOST:$KAFKA_PORT"
  setsid nohup "$TANSU" broker --storage-engine memory://tansu/ \
    --listener-url "tcp://$KAFKA_HOST:$KAFKA_PORT" \
    --advertised-listener-url "tcp://$KAFKA_HOST:$KAFKA_PORT" \
    >>"$STATE_DIR/tansu.log" 2>&1 </dev/null &
  echo $! >"$STATE_DIR/tansu.pid"
  if ! wait_for tansu 60 kafka_ready; then
    tail -n 20 "$STATE_DIR/tansu.log" >&2 || true; return 1
  fi
}

tansu_stop() { stop_started tansu; }

# ---------------------------------------------------------------------------------------------

print_env() {
  echo "export GOCHAT_TEST_MYSQL_URL=$(mysql_url)"
  echo "export GOCHAT_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT"
  echo "export GOCHAT_TEST_KAFKA_BROKERS=$KAFKA_HOST:$KAFKA_PORT"
  echo "export GOCHAT_TEST_ETCD_ENDPOINTS=$ETCD_CLIENT_URL"
}

case "${1:-}" in
  up)
    mysql_start
    redis_start
    etcd_start
    tansu_start
    log "up: MariaDB $(mysql_url | sed 's/:[^:@]*@/:***@/'), Redis 127.0.0.1:$REDIS_PORT," \
      "etcd $ETCD_CLIENT_URL, Kafka (tansu) $KAFKA_HOST:$KAFKA_PORT"
    ;;
  down)
    tansu_stop
    etcd_stop
    redis_stop
    mysql_stop
    ;;
  status)
    if mysql_up_any >/dev/null 2>&1; then echo "mariadb: up"; else echo "mariadb: down"; fi
    if redis_ping; then echo "redis: up"; else echo "redis: down"; fi
    if etcd_health; then echo "etcd: up"; else echo "etcd: down"; fi
    if kafka_port_open; then echo "kafka: up"; else echo "kafka: down"; fi
    ;;
  env)
    print_env
    ;;
  *)
    echo "usage: $0 up|down|status|env" >&2
    exit 2
    ;;
esac
