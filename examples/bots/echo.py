#!/usr/bin/env python3
"""An echo bot for `tern daemon`: sends every message it receives back to
whoever sent it. Python 3 standard library only.

    tern daemon --home ~/bots/echo --socket ~/.tern-echo/d.sock &
    examples/bots/echo.py ~/.tern-echo/d.sock

The socket is the first argument, or $TERN_SOCKET. The protocol is
docs/JSONRPC.md (docs/jsonrpc.schema.json describes every field).

Delivery is at least once: after a reconnect or a daemon restart a message
may come again, with the same id, so the bot remembers the ids it echoed.
When the daemon goes away the bot connects again (with a growing pause),
and the daemon hands it what arrived meanwhile. With `tern daemon
--manual-ack`, a message is acknowledged only once its echo was sent, so a
bot killed in between gets it again.

It never prints message text (only counts), as tern itself does not log it.
"""

import json
import os
import signal
import socket
import sys
import time
from collections import OrderedDict

# How many message ids to remember for dropping repeats.
SEEN_KEPT = 10000


def log(what):
    print(f"echo: {what}", file=sys.stderr, flush=True)


class Bot:
    def __init__(self, path):
        self.path = path
        self.seen = OrderedDict()
        self.next_id = 1
        # Request id -> message id to acknowledge once the echo is sent.
        self.acks_due = {}
        self.manual_ack = False
        self.echoed = 0

    def request(self, sock, method, params):
        rid = self.next_id
        self.next_id += 1
        line = json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        sock.sendall(line.encode() + b"\n")
        return rid

    def remember(self, msg_id):
        """Whether this id is new; remembers it (the newest SEEN_KEPT)."""
        if msg_id in self.seen:
            return False
        self.seen[msg_id] = True
        while len(self.seen) > SEEN_KEPT:
            self.seen.popitem(last=False)
        return True

    def on_line(self, sock, v):
        method = v.get("method")
        if method == "message":
            p = v["params"]
            # Copies of what this profile's other devices sent come as "out".
            if p.get("direction") != "in":
                return
            if not self.remember(p["id"]):
                # A repeat: echoed already; acknowledge it again if asked to.
                if self.manual_ack:
                    self.request(sock, "ack", {"profile": p["profile"], "id": p["id"]})
                return
            rid = self.request(
                sock,
                "send",
                {"profile": p["profile"], "contact": p["contact"], "text": p["text"]},
            )
            self.acks_due[rid] = (p["profile"], p["id"])
        elif method == "error":
            log(f"daemon error ({v['params'].get('kind')}): {v['params'].get('message')!r}")
        elif method is None and "id" in v:
            due = self.acks_due.pop(v["id"], None)
            if "error" in v:
                e = v["error"]
                # -32075: no relay took it now; the daemon keeps it and retries.
                log(f"request {v['id']} failed: {e.get('code')} {e.get('message')!r}")
            elif due is not None:
                self.echoed += 1
                if self.echoed % 100 == 0:
                    log(f"{self.echoed} echoed")
            # Acknowledged once answered, even with an error: -32075 means
            # the daemon keeps the echo and retries it, and any other error
            # would come again for ever.
            if due is not None and self.manual_ack:
                self.request(sock, "ack", {"profile": due[0], "id": due[1]})

    def session(self):
        """One connection, until the daemon hangs up."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(self.path)
            sub = self.request(sock, "subscribe", {})
            buf = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    v = json.loads(line)
                    if v.get("id") == sub and "result" in v:
                        self.manual_ack = v["result"].get("manual_ack", False)
                        log(f"subscribed ({v['result'].get('pending', 0)} pending)")
                        continue
                    self.on_line(sock, v)

    def run(self):
        pause = 0.2
        while True:
            started = time.monotonic()
            try:
                self.session()
                log("the daemon hung up; connecting again")
            except (OSError, ValueError) as e:
                log(f"not connected ({e.__class__.__name__}); trying again in {pause:.1f}s")
            # Responses still due are lost with the connection; the
            # messages are redelivered (manual ack) or were echoed.
            self.acks_due.clear()
            if time.monotonic() - started > 30:
                pause = 0.2
            time.sleep(pause)
            pause = min(pause * 2, 10)


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TERN_SOCKET")
    if not path:
        print("usage: echo.py SOCKET (or set TERN_SOCKET)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        Bot(path).run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
