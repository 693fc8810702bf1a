#!/usr/bin/env bash
# An echo bot for `tern daemon` with socat and jq: sends every message it
# receives back to whoever sent it.
#
#   tern daemon --home ~/bots/echo --socket ~/.tern-echo/d.sock &
#   examples/bots/echo.sh ~/.tern-echo/d.sock
#
# The socket is the first argument, or $TERN_SOCKET. jq turns each
# `message` notification into a `send` request, which goes back to the
# daemon on the same connection (through a fifo); the responses are not read (a send that
# no relay took is kept and retried by the daemon). Delivery is at least
# once: jq drops an id it has seen on this connection. When the daemon
# goes away, the loop connects again and the daemon hands over what
# arrived meanwhile. Message text is never printed.
set -u
sock=${1:-${TERN_SOCKET:-}}
if [ -z "$sock" ]; then
    echo "usage: echo.sh SOCKET (or set TERN_SOCKET)" >&2
    exit 2
fi
for tool in socat jq; do
    command -v "$tool" >/dev/null || { echo "echo.sh: needs $tool" >&2; exit 2; }
done
trap 'exit 0' TERM INT
# A write to a socat that has gone fails instead of killing the script.
trap '' PIPE

# Each message in once (ids seen on this connection dropped), as a send.
filter='
  foreach (inputs | select(.method == "message" and .params.direction == "in")) as $m
    ({seen: {}, out: null};
     if .seen[$m.params.id] then .out = null
     else .seen[$m.params.id] = true | .out = $m.params end;
     .out)
  | select(. != null)
  | {jsonrpc: "2.0", id: ("echo-" + .id), method: "send",
     params: {profile: .profile, contact: .contact, text: .text}}'

# jq's requests go back to socat's input through a fifo.
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkfifo "$dir/requests"
subscribe='{"jsonrpc":"2.0","id":"subscribe","method":"subscribe"}'

pause=1
while true; do
    started=$SECONDS
    echo "echo.sh: connecting to $sock" >&2
    # Ends when the daemon hangs up (or cannot be reached): socat ends,
    # jq sees the end of its input, and cat the end of the fifo.
    { printf '%s\n' "$subscribe"; cat "$dir/requests"; } |
        socat - "UNIX-CONNECT:$sock" |
        jq -n -c --unbuffered "$filter" >"$dir/requests"
    [ $((SECONDS - started)) -gt 10 ] && pause=1
    echo "echo.sh: the daemon hung up or is not there; connecting again in ${pause}s" >&2
    sleep "$pause"
    pause=$(( pause < 8 ? pause * 2 : 8 ))
done
