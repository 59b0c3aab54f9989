# Shared by start.sh, sp.sh and kill.sh (sourced, not run): where things
# are, and the running proxy's pid.  Every path can be set from outside:
#
#   MYDATAPROXY_HOME     the checkout with its .venv (default: two levels above this file)
#   MYDATAPROXY_CONFIG   the config file (default: $MYDATAPROXY_HOME/etc/mydataproxy.toml;
#                        the Java product's application.properties works too)
#   MYDATAPROXY_PIDFILE  twistd's pidfile (default: $MYDATAPROXY_HOME/run/mydataproxy.pid)
#   MYDATAPROXY_CONSOLE  where twistd's own output goes (default: $MYDATAPROXY_HOME/run/console.log;
#                        the access and error logs go where [logging] says)

here=$(cd "$(dirname "$0")" && pwd)
MYDATAPROXY_HOME=${MYDATAPROXY_HOME:-$(cd "$here/../.." && pwd)}
MYDATAPROXY_CONFIG=${MYDATAPROXY_CONFIG:-$MYDATAPROXY_HOME/etc/mydataproxy.toml}
MYDATAPROXY_PIDFILE=${MYDATAPROXY_PIDFILE:-$MYDATAPROXY_HOME/run/mydataproxy.pid}
MYDATAPROXY_CONSOLE=${MYDATAPROXY_CONSOLE:-$MYDATAPROXY_HOME/run/console.log}
bin=$MYDATAPROXY_HOME/.venv/bin

# Is process $1 a MyData Proxy (twistd ... mydataproxy ...)?  Not once it
# has exited, even if nobody reaped it yet (its command line is then empty).
is_proxy() {
    [ -r "/proc/$1/cmdline" ] && tr '\0' '\n' < "/proc/$1/cmdline" 2> /dev/null | grep -qx mydataproxy
}

# The pid of the running proxy, from the pidfile; empty when it is not
# running.  A pid whose process is not MyData Proxy (a stale pidfile, the
# number reused) counts as not running: it is never signalled.
running_pid() {
    [ -r "$MYDATAPROXY_PIDFILE" ] || return 0
    pid=$(tr -dc 0-9 < "$MYDATAPROXY_PIDFILE")
    if [ -n "$pid" ] && is_proxy "$pid"; then
        echo "$pid"
    fi
}
