#!/usr/bin/env python3
"""Test-only bridge: a small subset of ClickHouse's HTTP interface in front of
chdb (the ClickHouse engine embedded in a Python module), so the server's
ClickHouse backend and its tests run real ClickHouse SQL without a
clickhouse-server binary.

    python3 bridge.py --port 0 --path DIR

prints `listening on PORT` once serving; with `--exit-with-stdin` it exits
when its standard input closes (so a test process that dies takes its bridge
with it).

What it speaks (what the `clickhouse` Rust crate sends):
- `GET /ping` -> `Ok.`
- `POST /?query=SQL` (or GET): the SQL from the `query` parameter; a body, if
  any, is the data of an `INSERT ... FORMAT F` statement;
- `POST /` with the SQL as body (and no `query` parameter);
- `default_format` selects the output format (RowBinaryWithNamesAndTypes for
  the crate's typed fetches), else `TabSeparated`;
- every other parameter that is not part of the HTTP interface itself
  (`insert_deduplication_token`, `async_insert`, ...) is a query setting,
  applied to INSERTs only (the client sends settings with inserts only);
- errors: HTTP 500 with `X-ClickHouse-Exception-Code` and the exception text.

INSERT data is written to a temporary file and inserted with
`INSERT INTO t(cols) SELECT * FROM file(path, F[, structure])`, so the bytes
are parsed by ClickHouse's own input format. Such an INSERT SELECT is
deduplicated like the `INSERT ... FORMAT` it stands for (by token, else by
content, where the table keeps a deduplication window), not only when the
SELECT's order is stable. `RowBinaryWithNamesAndTypes`
carries its structure; for plain `RowBinary` it comes from `DESCRIBE TABLE`.

The `database` parameter is NOT applied (chdb sessions do not keep `USE`
across queries): clients must qualify table names, as the server does.
Requests are served one at a time (one chdb session).
"""

import argparse
import os
import re
import sys
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    from chdb import session as chs
except ImportError as e:  # pragma: no cover - reported to the test
    sys.stderr.write(
        f"chdb is not installed ({e}); install it with `pip install chdb`\n"
    )
    sys.exit(3)

INSERT_RE = re.compile(
    r"^\s*INSERT\s+INTO\s+(?P<table>[^\s(]+)\s*(?:\((?P<cols>[^)]*)\))?\s*FORMAT\s+(?P<fmt>\w+)\s*;?\s*$",
    re.IGNORECASE | re.DOTALL,
)
CODE_RE = re.compile(r"Code:\s*(\d+)")
# URL parameters of the HTTP interface that are not query settings.
HTTP_PARAMS = {"query", "database", "default_format", "user", "password",
               "query_id", "session_id", "session_timeout", "session_check",
               "compress", "decompress", "role", "quota_key", "buffer_size",
               "wait_end_of_query"}

LOCK = threading.Lock()
SESSION = None
TMP = None


def split_cols(cols):
    return [c.strip() for c in cols.split(",") if c.strip()]


def unquote_ident(name):
    return name.strip().strip("`").strip('"')


def run(sql, fmt):
    with LOCK:
        res = SESSION.query(sql, fmt)
    data = res.bytes() if hasattr(res, "bytes") else bytes(res)
    return data or b""


def settings_clause(params):
    settings = {"deduplicate_insert_select": "enable_even_for_bad_queries"}
    settings.update((k, v) for k, v in params.items()
                    if k not in HTTP_PARAMS and not k.startswith("param_"))
    for k in settings:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise ValueError(f"not a setting name: {k!r}")
    quote = lambda v: "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return " SETTINGS " + ", ".join(f"{k} = {quote(v)}" for k, v in settings.items())


def insert(m, body, params):
    table = m.group("table")
    cols = split_cols(m.group("cols") or "")
    fmt = m.group("fmt")
    fd, path = tempfile.mkstemp(dir=TMP, suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        col_list = f"({', '.join(cols)})" if cols else ""
        if fmt.lower() in ("rowbinarywithnamesandtypes", "native", "jsoneachrow",
                           "tabseparatedwithnamesandtypes", "csvwithnamesandtypes"):
            src = f"file('{path}', '{fmt}')"
        else:
            desc = run(f"DESCRIBE TABLE {table}", "TabSeparated").decode()
            types = {}
            for line in desc.splitlines():
                parts = line.split("\t")
                types[parts[0]] = parts[1]
            names = [unquote_ident(c) for c in cols] or list(types)
            structure = ", ".join(f"`{n}` {types[n]}" for n in names)
            src = f"file('{path}', '{fmt}', '{structure}')"
        run(f"INSERT INTO {table}{col_list}{settings_clause(params)} SELECT * FROM {src}",
            "TabSeparated")
    finally:
        os.unlink(path)
    return b""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        if os.environ.get("BRIDGE_VERBOSE"):
            sys.stderr.write("bridge: " + (fmt % args) + "\n")

    def reply(self, status, body, headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path in ("/ping", "/replicas_status"):
            return self.reply(200, b"Ok.\n")
        params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            body = self.read_chunked()
        if "query" in params:
            sql, data = params["query"], body
        else:
            sql, data = body.decode("utf-8"), b""
        fmt = params.get("default_format") or "TabSeparated"
        try:
            m = INSERT_RE.match(sql)
            if m and data:
                out = insert(m, data, params)
            elif m:
                out = b""  # an INSERT without rows
            else:
                out = run(sql, fmt)
        except Exception as e:  # chdb raises RuntimeError with the server text
            text = str(e)
            code = CODE_RE.search(text)
            if os.environ.get("BRIDGE_VERBOSE"):
                sys.stderr.write(f"bridge: error for {sql[:300]!r}: {text}\n")
            return self.reply(
                500,
                (text if text.startswith("Code:") else f"Code: 1000. DB::Exception: {text}").encode()
                + b"\n",
                [("X-ClickHouse-Exception-Code", code.group(1) if code else "1000"),
                 ("Content-Type", "text/plain; charset=UTF-8")],
            )
        self.reply(200, out, [("Content-Type", "application/octet-stream"),
                              ("X-ClickHouse-Format", fmt)])

    def read_chunked(self):
        out = b""
        while True:
            line = self.rfile.readline().strip()
            size = int(line.split(b";")[0], 16)
            if size == 0:
                self.rfile.readline()
                return out
            out += self.rfile.read(size)
            self.rfile.readline()

    do_GET = handle_any
    do_POST = handle_any


def main():
    global SESSION, TMP
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--path", required=True, help="chdb data directory (persistent)")
    ap.add_argument("--exit-with-stdin", action="store_true",
                    help="exit when standard input closes (tests keep a pipe open)")
    a = ap.parse_args()
    os.makedirs(a.path, exist_ok=True)
    TMP = tempfile.mkdtemp(prefix="chdb-bridge-")
    SESSION = chs.Session(a.path)
    srv = ThreadingHTTPServer((a.host, a.port), Handler)
    srv.daemon_threads = True
    print(f"listening on {srv.server_address[1]}", flush=True)

    def watch_stdin():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except Exception:
            pass
        os._exit(0)

    if a.exit_with_stdin:
        threading.Thread(target=watch_stdin, daemon=True).start()
    srv.serve_forever()


if __name__ == "__main__":
    main()
