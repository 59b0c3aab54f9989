#!/bin/sh
# Stop MyData Proxy, as the Java product's kill.sh did (with systemd:
# systemctl stop mydataproxy).  SIGTERM lets it finish the requests in
# flight and flush its logs; after MYDATAPROXY_STOP_TIMEOUT seconds
# (default 30) it is killed.
set -eu
. "$(dirname "$0")/common.sh"
timeout=${MYDATAPROXY_STOP_TIMEOUT:-30}

pid=$(running_pid)
if [ -z "$pid" ]; then
    echo "MyData Proxy is not running (pidfile $MYDATAPROXY_PIDFILE)"
    exit 0
fi
kill -TERM "$pid"
waited=0
while is_proxy "$pid"; do
    if [ "$waited" -ge "$((timeout * 10))" ]; then
        kill -KILL "$pid"
        rm -f "$MYDATAPROXY_PIDFILE"
        echo "MyData Proxy (pid $pid) did not stop within $timeout s: killed"
        exit 1
    fi
    sleep 0.1
    waited=$((waited + 1))
done
echo "MyData Proxy (pid $pid) stopped"
