#!/bin/sh
# Is MyData Proxy running (the Java product's sp.sh: ps -ef | grep)?  Shows
# the process, then what its admin listener says when the config has one.
# Exit status: 0 running, 3 not running (as LSB status commands).
set -eu
. "$(dirname "$0")/common.sh"

pid=$(running_pid)
if [ -z "$pid" ]; then
    echo "MyData Proxy is not running (pidfile $MYDATAPROXY_PIDFILE)"
    exit 3
fi
rss=$(sed -n 's/^VmRSS:[[:space:]]*//p' "/proc/$pid/status")
echo "MyData Proxy is running (pid $pid, RSS $rss): $(tr '\0' ' ' < "/proc/$pid/cmdline")"
"$bin/mydataproxy" status --config "$MYDATAPROXY_CONFIG" 2>&1 | sed 's/^error: /  /' || true
