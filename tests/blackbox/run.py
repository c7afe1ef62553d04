#!/usr/bin/env python3
"""Black-box run of the `gateway` example, driven from outside Rust.

    python3 tests/blackbox/run.py path/to/gateway

Everything around the gateway binary is foreign to the crate: a private
`redis-server` (from $REDIS_SERVER_BIN or $PATH) on a free loopback port, a
target written with Python's `http.server`, the heartbeat set and deleted
with `redis-cli` (from $REDIS_CLI_BIN, $PATH, or next to the server), and a
client using `urllib`. Python 3 standard library only.

The run:

1. `SET <key> 1 PX 3000` (refreshed every second by a thread); writes and a
   read go through the gateway and are answered 200 by the Python target.
2. `DEL <key>`: writes get 202 with an `Idempotency-Key` header, a read gets
   503, `XLEN` of the buffer counts the writes, the target sees none of them.
3. The heartbeat is set again: the target receives the buffered writes, in
   order, each with its idempotency key, once; the buffer empties; the
   gateway's `/metrics` (`--metrics-listen`) agrees.
4. SIGTERM: the gateway exits with status 0.

Prints `blackbox: forwarded=N buffered=M replayed=M lost=0` last and exits 0;
on any failure prints why (with the tail of the gateway's log) and exits 1.
Child processes are always stopped, also on SIGTERM/SIGINT to this script.
Waits poll with deadlines; the only sleeps are short polling intervals.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# An explicit key outside the crate's namespace, as a legacy service keeps it.
HEARTBEAT_KEY = "legacy:billing:alive"
TTL_MS = 3000
REFRESH_EVERY = 1.0
POLL = 0.02
READY_TIMEOUT = 20.0
CHANGE_TIMEOUT = 10.0
REPLAY_TIMEOUT = 30.0
EXIT_TIMEOUT = 15.0
HTTP_TIMEOUT = 10.0


class Failure(Exception):
    """A check of the run failed."""


def check(condition, message):
    if not condition:
        raise Failure(message)


def log(message):
    print(f"blackbox: {message}", flush=True)


def wait_for(what, timeout, probe):
    """Calls `probe` every POLL seconds until it returns a truthy value
    (returned) or `timeout` seconds pass (Failure)."""
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    while True:
        value = probe()
        if value:
            log(f"{what}: after {time.monotonic() - started:.3f}s")
            return value
        if time.monotonic() >= deadline:
            raise Failure(f"{what}: not within {timeout}s")
        time.sleep(POLL)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary(env_var, name, near=None):
    path = os.environ.get(env_var)
    if path:
        check(os.path.isfile(path), f"{env_var}={path} is not a file")
        return path
    found = shutil.which(name)
    if found:
        return found
    if near:
        sibling = os.path.join(os.path.dirname(near), name)
        if os.path.isfile(sibling):
            return sibling
    raise Failure(
        f"{name} not found: install it (Debian/Ubuntu: sudo apt-get install "
        f"redis-server, which brings redis-cli) or set {env_var}"
    )


# ------------------------------------------------------------------ redis


class Redis:
    """A private redis-server child process, and redis-cli against it."""

    def __init__(self, server_bin, cli_bin, workdir):
        self.server_bin = server_bin
        self.cli_bin = cli_bin
        self.workdir = workdir
        self.process = None
        self.port = None

    def start(self):
        for _ in range(5):
            port = free_port()
            logfile = os.path.join(self.workdir, "redis.log")
            self.process = subprocess.Popen(
                [
                    self.server_bin,
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", self.workdir,
                    "--logfile", logfile,
                    # Deletions reach the gateway at once; without this it
                    # would still see them at its next reconciliation.
                    "--notify-keyspace-events", "KEA",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.port = port
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break  # port taken meanwhile, most likely: try another
                if self.try_cli("PING") == "PONG":
                    log(f"redis-server {self.process.pid} on port {port}")
                    return
                time.sleep(POLL)
            self.stop()
        raise Failure(f"redis-server did not start; see {self.workdir}/redis.log")

    def try_cli(self, *args):
        result = subprocess.run(
            [self.cli_bin, "-h", "127.0.0.1", "-p", str(self.port), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if result.returncode != 0:
            return None
        return result.stdout.strip()

    def cli(self, *args):
        """`redis-cli -p PORT ARGS...`: its reply (raw output, stripped)."""
        out = self.try_cli(*args)
        check(out is not None, f"redis-cli {' '.join(args)} failed")
        check(
            not re.match(r"^(ERR|WRONGTYPE|NOAUTH|NOPERM)\b", out),
            f"redis-cli {' '.join(args)}: {out}",
        )
        return out

    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def stop(self):
        stop_process(self.process, "redis-server")
        self.process = None


# ----------------------------------------------------------------- target


class Target:
    """The service behind the gateway: records every request and answers 200."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []
        target = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_any(self):
                body = self.read_body()
                record = {
                    "method": self.command,
                    "path": self.path,
                    "body": body.decode("utf-8", "replace"),
                    "idempotency_key": self.headers.get("idempotency-key"),
                    "replay": self.headers.get("x-heartbeat-replay"),
                    "host": self.headers.get("host"),
                }
                with target.lock:
                    target.requests.append(record)
                reply = f"python target got {self.command} {self.path}\n".encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("x-target", "python")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply)

            def read_body(self):
                if "chunked" in self.headers.get("transfer-encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("content-length") or 0)
                return self.rfile.read(length) if length else b""

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any
            do_HEAD = do_OPTIONS = handle_any

            def log_message(self, format, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        log(f"python target on {self.url()}")

    def url(self):
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def received(self):
        """Every request but the gateway probes of this script."""
        with self.lock:
            return [r for r in self.requests if not r["path"].startswith("/probe")]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# -------------------------------------------------------------- heartbeat


class Heartbeat:
    """`SET key 1 PX ttl`, renewed every second by a thread while alive."""

    def __init__(self, redis, key):
        self.redis = redis
        self.key = key
        self.lock = threading.Lock()  # held around every write of the key
        self.alive = False
        self.stopping = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def set(self):
        with self.lock:
            reply = self.redis.cli("SET", self.key, "1", "PX", str(TTL_MS))
            check(reply == "OK", f"SET {self.key}: {reply}")
            self.alive = True

    def delete(self):
        """Stops renewing, then deletes: no renewal can land after the DEL."""
        with self.lock:
            self.alive = False
            reply = self.redis.cli("DEL", self.key)
            check(reply == "1", f"DEL {self.key}: {reply}")

    def run(self):
        while not self.stopping.wait(REFRESH_EVERY):
            with self.lock:
                if not self.alive:
                    continue
                try:
                    self.redis.cli("SET", self.key, "1", "PX", str(TTL_MS))
                except Exception as e:  # reported by the main thread
                    self.error = e

    def stop(self):
        self.stopping.set()
        self.thread.join(timeout=15)


# ---------------------------------------------------------------- gateway


class Gateway:
    """The gateway example as a child process: stdout lines collected by a
    thread, stderr (its log) in a file."""

    def __init__(self, binary, workdir):
        self.binary = binary
        self.logpath = os.path.join(workdir, "gateway.log")
        self.process = None
        self.lines = []
        self.lines_lock = threading.Lock()

    def start(self, redis, target, key):
        env = dict(os.environ)
        env.pop("REDIS_URL", None)
        env.setdefault("RUST_LOG", "info")
        self.logfile = open(self.logpath, "wb")
        self.process = subprocess.Popen(
            [
                self.binary,
                "--listen", "127.0.0.1:0",
                "--metrics-listen", "127.0.0.1:0",
                "--target", target.url(),
                "--redis", redis.url(),
                "--heartbeat-key", key,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.logfile,
            env=env,
        )
        threading.Thread(target=self.read_stdout, daemon=True).start()

        def ready():
            check(
                self.process.poll() is None,
                f"gateway exited before listening (status {self.process.returncode})",
            )
            return self.line_value("gateway listening on ")

        self.addr = wait_for("gateway listening", READY_TIMEOUT, ready)
        self.metrics_addr = self.line_value("metrics listening on ")
        check(self.metrics_addr, "no `metrics listening on` line before `gateway listening on`")
        buffer_line = self.line_value("buffer target: ")
        check(buffer_line, "no `buffer target:` line")
        match = re.search(r"buffer (\S+)\)$", buffer_line)
        check(match, f"no buffer key in `buffer target: {buffer_line}`")
        self.queue_key = match.group(1)
        self.target_name = buffer_line.split(" ")[0]
        log(f"gateway {self.process.pid} on {self.addr}, metrics on {self.metrics_addr}, "
            f"buffer {self.queue_key}")

    def read_stdout(self):
        for raw in self.process.stdout:
            with self.lines_lock:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def line_value(self, prefix):
        with self.lines_lock:
            for line in self.lines:
                if line.startswith(prefix):
                    return line[len(prefix):]
        return None

    def url(self, path):
        return f"http://{self.addr}{path}"

    def terminate(self):
        """SIGTERM, as a supervisor would; returns the exit status."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise Failure(f"gateway still running {EXIT_TIMEOUT}s after SIGTERM")

    def log_tail(self, lines=40):
        try:
            with open(self.logpath, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self):
        stop_process(self.process, "gateway")
        if self.process is not None and self.process.stdout:
            self.process.stdout.close()
        if getattr(self, "logfile", None):
            self.logfile.close()


def stop_process(process, name):
    """SIGTERM, then SIGKILL after 5 s; always reaped."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log(f"{name} {process.pid} ignored SIGTERM: SIGKILL")
        process.kill()
        process.wait()


# ----------------------------------------------------------------- client

# No proxy from the environment may stand between us and 127.0.0.1.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def send(method, url, body=None, headers=None):
    """One request: (status, headers as a lower-cased dict, body text)."""
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with OPENER.open(request, timeout=HTTP_TIMEOUT) as response:
            status, head, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:  # any status outside 2xx
        status, head, raw = e.code, e.headers, e.read()
    headers = {k.lower(): v for k, v in head.items()}
    return status, headers, raw.decode("utf-8", "replace")


def sample(metrics_text, name, labels):
    """The value of the sample `name{labels}` in Prometheus text, or None."""
    prefix = f"{name}{{{labels}}} "
    for line in metrics_text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None


# -------------------------------------------------------------------- run


def run(gateway_bin, workdir, cleanup, context):
    """The whole run; returns the summary line. `cleanup` gets what to undo,
    `context` what to show on failure."""
    check(os.path.isfile(gateway_bin), f"no gateway binary at {gateway_bin}")
    server_bin = find_binary("REDIS_SERVER_BIN", "redis-server")
    cli_bin = find_binary("REDIS_CLI_BIN", "redis-cli", near=server_bin)

    redis = Redis(server_bin, cli_bin, workdir)
    cleanup.append(redis.stop)
    redis.start()

    target = Target()
    cleanup.append(target.stop)
    target.start()

    heartbeat = Heartbeat(redis, HEARTBEAT_KEY)
    cleanup.append(heartbeat.stop)
    heartbeat.set()
    log(f"redis-cli SET {HEARTBEAT_KEY} 1 PX {TTL_MS} (renewed every {REFRESH_EVERY}s)")

    gateway = Gateway(gateway_bin, workdir)
    cleanup.append(gateway.stop)
    context["gateway"] = gateway
    gateway.start(redis, target, HEARTBEAT_KEY)
    check(gateway.target_name == HEARTBEAT_KEY,
          f"a valid key names its buffer: {gateway.target_name}")
    labels = f'target="{gateway.target_name}"'

    # 1. Up: everything reaches the target (the heartbeat was read before
    # the gateway listened).
    forwarded = 0
    for i in range(3):
        status, headers, text = send(
            "POST", gateway.url(f"/invoices?n={i}"), f'{{"up":{i}}}',
            {"content-type": "application/json", "idempotency-key": f"up-{i}"},
        )
        check(status == 200 and headers.get("x-target") == "python",
              f"POST while up: {status} {headers} {text}")
        forwarded += 1
    status, headers, text = send("GET", gateway.url("/invoices"))
    check(status == 200 and headers.get("x-target") == "python",
          f"GET while up: {status} {text}")
    forwarded += 1
    seen = target.received()
    check([r["path"] for r in seen] == ["/invoices?n=0", "/invoices?n=1", "/invoices?n=2",
                                        "/invoices"], f"target saw {seen}")
    check([r["idempotency_key"] for r in seen[:3]] == ["up-0", "up-1", "up-2"], f"{seen}")
    check(seen[0]["body"] == '{"up":0}', f"{seen[0]}")
    log(f"up: {forwarded} requests forwarded, answered 200 by the python target")

    # 2. Down: the key is deleted.
    heartbeat.delete()
    log(f"redis-cli DEL {HEARTBEAT_KEY}")

    def refused_read():
        status, headers, _ = send("GET", gateway.url("/probe"))
        return status == 503 and "x-target" not in headers

    wait_for("gateway refuses reads (503)", CHANGE_TIMEOUT, refused_read)
    before_down = len(target.received())

    buffered = []  # (method, path, body, idempotency key), in sending order
    for i in range(5):
        method = "PUT" if i == 3 else "POST"
        path = f"/invoices/{i}" if method == "PUT" else f"/invoices?down={i}"
        body = json.dumps({"down": i})
        headers = {"content-type": "application/json"}
        if i != 4:  # the last one gets its key from the gateway
            headers["idempotency-key"] = f"bb-{i}"
        status, answer_headers, text = send(method, gateway.url(path), body, headers)
        check(status == 202, f"{method} {path} while down: {status} {text}")
        check("x-target" not in answer_headers, "answered by the target while down")
        key = answer_headers.get("idempotency-key")
        check(key, f"202 without an idempotency-key header: {answer_headers}")
        if i != 4:
            check(key == f"bb-{i}", f"the caller's key comes back: {key}")
        check(f'"queue_len":{i + 1}' in text, f"202 body: {text}")
        buffered.append((method, path, body, key))
    status, headers, text = send("GET", gateway.url("/invoices"))
    check(status == 503 and "x-target" not in headers, f"GET while down: {status} {text}")
    check("target_down" in text, f"503 body: {text}")
    xlen = redis.cli("XLEN", gateway.queue_key)
    check(xlen == str(len(buffered)), f"XLEN {gateway.queue_key}: {xlen}")
    check(len(target.received()) == before_down, "a request reached the target while down")
    log(f"down: {len(buffered)} writes answered 202 with an idempotency-key, GET 503, "
        f"redis-cli XLEN {gateway.queue_key} = {xlen}")

    # 3. Back: the buffer is replayed, in order.
    heartbeat.set()
    log(f"redis-cli SET {HEARTBEAT_KEY} 1 PX {TTL_MS}")

    def replays():
        got = [r for r in target.received() if r["replay"] == "1"]
        return got if len(got) >= len(buffered) else None

    replayed = wait_for(f"{len(buffered)} replays reached the python target",
                        REPLAY_TIMEOUT, replays)
    wait_for(f"XLEN {gateway.queue_key} = 0", CHANGE_TIMEOUT,
             lambda: redis.cli("XLEN", gateway.queue_key) == "0")
    replayed = [r for r in target.received() if r["replay"] == "1"]
    check(len(replayed) == len(buffered), f"each once: {replayed}")
    for (method, path, body, key), got in zip(buffered, replayed):
        check((got["method"], got["path"], got["body"], got["idempotency_key"])
              == (method, path, body, key),
              f"in order, as sent: expected {(method, path, body, key)}, got {got}")
    delivered_keys = {r["idempotency_key"] for r in replayed}
    lost = sum(1 for (_, _, _, key) in buffered if key not in delivered_keys)

    def metrics_agree():
        _, _, text = send("GET", f"http://{gateway.metrics_addr}/metrics")
        done = (sample(text, "thb_buffered_total", labels) == len(buffered)
                and sample(text, "thb_replayed_total", labels) == len(buffered)
                and sample(text, "thb_target_up", labels) == 1
                and sample(text, "thb_queue_depth", labels) == 0)
        return text if done else None

    text = wait_for("/metrics: buffered, replayed, up, empty", CHANGE_TIMEOUT, metrics_agree)
    log(f"metrics: forwarded_total={sample(text, 'thb_forwarded_total', labels):g} "
        f"(this script's probes count too) buffered_total="
        f"{sample(text, 'thb_buffered_total', labels):g} "
        f"replayed_total={sample(text, 'thb_replayed_total', labels):g}")
    if heartbeat.error:
        raise Failure(f"heartbeat renewal failed: {heartbeat.error}")

    # 4. SIGTERM: a clean stop.
    status = gateway.terminate()
    check(status == 0, f"gateway exit status after SIGTERM: {status}")
    log("SIGTERM: gateway exited with status 0")
    check(len([r for r in target.received() if r["replay"] == "1"]) == len(buffered),
          "a replay came twice")

    check(lost == 0, f"{lost} buffered requests never reached the target")
    return (f"blackbox: forwarded={forwarded} buffered={len(buffered)} "
            f"replayed={len(replayed)} lost={lost}")


def on_signal(number, _frame):
    raise KeyboardInterrupt(f"signal {number}")


def main():
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} <gateway-binary>", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="thb-blackbox-")
    cleanup = []
    context = {}
    summary = None
    try:
        summary = run(os.path.abspath(sys.argv[1]), workdir, cleanup, context)
    except Failure as e:
        print(f"blackbox: FAILED: {e}", file=sys.stderr, flush=True)
    except KeyboardInterrupt as e:
        print(f"blackbox: interrupted ({e})", file=sys.stderr, flush=True)
    except Exception:
        print("blackbox: FAILED with an unexpected error:", file=sys.stderr, flush=True)
        traceback.print_exc()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
        if summary is None and "gateway" in context:
            tail = context["gateway"].log_tail()
            print(f"--- gateway log (tail) ---\n{tail}\n---", file=sys.stderr, flush=True)
        for step in reversed(cleanup):
            try:
                step()
            except Exception as e:  # keep cleaning up
                print(f"blackbox: cleanup: {e!r}", file=sys.stderr, flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
    if summary is None:
        log(f"FAILED after {time.monotonic() - started:.2f}s")
        return 1
    log(f"ok in {time.monotonic() - started:.2f}s")
    print(summary, flush=True)  # the last line
    return 0


if __name__ == "__main__":
    sys.exit(main())
