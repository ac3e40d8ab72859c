#!/usr/bin/env bash
# Make sure RabbitMQ (with the management plugin) and PostgreSQL answer on 127.0.0.1.
# Starts them the way ../shared/SERVICES.md says; installs them with apt on a bare machine.
set -euo pipefail

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if ! command -v pg_isready >/dev/null || ! command -v rabbitmq-server >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing rabbitmq-server and postgresql with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server postgresql >/dev/null
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    echo "starting rabbitmq and postgres with docker compose"
    docker compose up -d rabbitmq postgres
  else
    echo "RabbitMQ and PostgreSQL are not installed and cannot be installed here" >&2
    exit 1
  fi
fi

if ! pg_up; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if ! amqp_up; then
  echo "starting RabbitMQ"
  rabbitmq-server -detached || true
fi
for _ in $(seq 1 60); do
  pg_up && amqp_up && break
  sleep 1
done
pg_up || { echo "PostgreSQL does not answer on 127.0.0.1:5432" >&2; exit 1; }
amqp_up || { echo "RabbitMQ does not answer on 127.0.0.1:5672" >&2; exit 1; }

# Unacked counts per queue come from the management API; enabling it is idempotent.
if command -v rabbitmq-plugins >/dev/null; then
  if ! rabbitmq-plugins list -e 2>/dev/null | grep -q "rabbitmq_management "; then
    rabbitmq-plugins enable rabbitmq_management >/dev/null 2>&1 || echo "note: management plugin not enabled (unacked counts unavailable)"
  fi
fi
# Quorum queues need every feature flag on (a fresh node has them; an upgraded one may not).
command -v rabbitmqctl >/dev/null && rabbitmqctl enable_feature_flag all >/dev/null 2>&1 || true
echo "services up: PostgreSQL 127.0.0.1:5432, RabbitMQ 127.0.0.1:5672"
