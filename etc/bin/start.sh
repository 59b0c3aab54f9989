#!/bin/sh
# Start MyData Proxy in the background, as the Java product's start.sh did
# (with systemd: systemctl start mydataproxy).  Checks the config first.
set -eu
. "$(dirname "$0")/common.sh"

pid=$(running_pid)
if [ -n "$pid" ]; then
    echo "MyData Proxy is already running (pid $pid)"
    exit 1
fi
"$bin/mydataproxy" check-config "$MYDATAPROXY_CONFIG" > /dev/null || exit 2
mkdir -p "$(dirname "$MYDATAPROXY_PIDFILE")" "$(dirname "$MYDATAPROXY_CONSOLE")"
rm -f "$MYDATAPROXY_PIDFILE"
nohup "$bin/twistd" -n --pidfile="$MYDATAPROXY_PIDFILE" mydataproxy --config "$MYDATAPROXY_CONFIG" \
    >> "$MYDATAPROXY_CONSOLE" 2>&1 < /dev/null &
started=$!
# twistd writes its pidfile once it runs; give it 10 s.
for _ in $(seq 100); do
    pid=$(running_pid)
    if [ "$pid" = "$started" ]; then
        echo "MyData Proxy started (pid $pid), config $MYDATAPROXY_CONFIG, output in $MYDATAPROXY_CONSOLE"
        exit 0
    fi
    # Ended (a zombie until this shell is gone): twistd refused to start.
    grep -qs '^State:[[:space:]]*[RSD]' "/proc/$started/status" || break
    sleep 0.1
done
echo "MyData Proxy did not start; the end of $MYDATAPROXY_CONSOLE:"
tail -n 20 "$MYDATAPROXY_CONSOLE"
exit 1
