"""A web page to write a number on and watch it read: `python demo.py [MODEL] [--port 8000]`.

Serves one page (demo.html: a canvas for mouse, pen or finger, with undo and clear; a photo from a
file, a drop or the camera) on 127.0.0.1, and the one call it makes, POST /api/read: the image
file's bytes in, JSON out — the digits, how sure the model is, each position's top candidates, the
picture the network was given and where each position looked. Images are read by digitseq.Reader,
the framing predict.py uses; requests that arrive together are read in one batch. A bad image is a
JSON error with one sentence, and the server goes on serving. The API and the measured latency:
docs/demo.md. `--benchmark` starts the server and sends it numbers of MNIST test digits from
several clients at once (JSON last line).
"""

from __future__ import annotations

import startup  # noqa: F401  (first: a quiet Ctrl-C while the libraries load; TensorFlow configured)

# isort: split
import argparse
import base64
import csv
import io
import ipaddress
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from http import HTTPStatus
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from digitseq import ImageFileError, Reader, Reading
from model import networks as nets
from model.artifacts import cpu_name
from model.recipes import FINE_TUNING
from model.workdir import atomic_write
from pipeline import flags, folders

PROG = "demo.py"
DEFAULT_MODEL = Path("runs/default")  # what `python train.py` writes
PAGE = Path(__file__).with_name("demo.html")
MAX_BODY = 20 * 2**20  # bytes a request may send: a phone's photo is 2–10 MB
BODY_SECONDS = 60  # for a request's body to arrive
MAX_BATCH = 16  # images read in one network call (each power of two up to it compiled at start)
TOP = 3  # candidates shown per position
CLASSES = [*map(str, range(10)), "blank"]
# The page may load only what this server sends: it works offline, and nothing leaves the machine.
POLICY = "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; script-src 'unsafe-inline'"


class Batcher:
    """One thread owns the network and reads, in one call, every request that waits when it is free:
    batches form as requests arrive together, and a lone request is not held back."""

    def __init__(self, reader: Reader, max_batch: int = MAX_BATCH):
        self.reader, self.max_batch = reader, max_batch
        self.batch_sizes: list[int] = []
        self._waiting: queue.SimpleQueue[tuple[np.ndarray, Future]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="reader", daemon=True).start()

    def read(self, prepared: np.ndarray) -> Reading:
        future: Future[Reading] = Future()
        self._waiting.put((prepared, future))
        return future.result()

    def _serve(self) -> None:
        while True:
            batch = [self._waiting.get()]
            while len(batch) < self.max_batch and not self._waiting.empty():
                batch.append(self._waiting.get())
            try:
                readings = self.reader.read_prepared([prepared for prepared, _ in batch])
            except Exception as error:  # answered to each request; the next batch is read as usual
                for _, future in batch:
                    future.set_exception(error)
                continue
            self.batch_sizes.append(len(batch))
            for (_, future), reading in zip(batch, readings, strict=True):
                future.set_result(reading)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(Image.fromarray(image))).decode()


def reading_json(reading: Reading) -> dict:
    """A reading as the page and docs/demo.md's API have it."""
    positions = []
    for k, probabilities in enumerate(reading.calibrated):  # on the confidence's scale: one scale on the page
        best = np.argsort(-probabilities, kind="stable")[:TOP]
        positions.append({
            "candidates": [{"label": CLASSES[c], "probability": round(float(probabilities[c]), 4)} for c in best],
            "where": None if reading.where is None else [round(float(w), 5) for w in reading.where[k]],
        })  # fmt: skip
    return {
        "digits": reading.digits,
        "confidence": round(reading.confidence, 4),
        "positions": positions,
        "image": png_data_url(reading.image),
    }


class Refused(Exception):
    """A request answered with an error: its status and one sentence."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def describe(reader: Reader) -> dict:
    """GET /api/model: the model the page reads with."""
    model = reader.model
    return {
        "model": model.description,
        "positions": model.network.positions,
        "image_size": list(model.image_size),
        "reads": model.reads,
        "where": any(isinstance(layer, nets.Attend) for layer in model.network.layers),
        "max_body": MAX_BODY,
    }


class Learner:
    """The page's corrections and "learn my hand". A correction is the picture that was read and its right
    digits, kept in a labelled folder (`pipeline.folders`' format: PNGs and labels.csv). Learning runs
    train.py — fine-tuning the model the server started with on every correction — as a process of its
    own beside the server; once it is done the server reads with the adapted model (its batch shapes compiled
    first), and can go back to the one before."""

    def __init__(
        self, batcher: Batcher, start: Path, folder: Path, epochs: int | None = None, train_flags: list[str] = ()
    ):
        self.batcher, self.start, self.folder, self.epochs = batcher, start, folder, epochs
        self.train_flags = list(train_flags)  # train.py's further flags (demo.py gives --mnist-dir, --data-dir)
        self.workdir = folder.parent / "learned"
        self.lock = threading.Lock()
        self.state, self.progress, self.message = "idle", 0.0, ""
        self.before: Reader | None = None

    def rows(self) -> list[list[str]]:
        labels = self.folder / folders.LABELS
        if not labels.is_file():
            return []
        return [row for row in list(csv.reader(labels.read_text().splitlines()))[1:] if row]

    def correct(self, image: bytes, digits: str) -> int:
        """Keeps `image` (a file's bytes: what was read) with its right `digits`; returns how many are kept."""
        positions = self.batcher.reader.model.network.positions
        if not (digits.isascii() and digits.isdigit() and 1 <= len(digits) <= positions):
            raise Refused(HTTPStatus.UNPROCESSABLE_ENTITY, f"the right digits must be 1 to {positions} digits 0-9, "
                          f"not {digits!r}")  # fmt: skip
        try:
            self.batcher.reader.prepare(image)
        except ImageFileError as error:
            raise Refused(HTTPStatus.UNPROCESSABLE_ENTITY, str(error)) from None
        with self.lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            rows = self.rows()
            name = f"correction_{len(rows) + 1:04d}.png"
            atomic_write(self.folder / name, image)  # the picture first: a row never names a missing file
            lines = [["file", "digits"], *rows, [name, digits]]
            atomic_write(self.folder / folders.LABELS, "".join(",".join(row) + "\n" for row in lines))
            return len(rows) + 1

    def learn(self) -> None:
        with self.lock:
            if self.state == "learning":
                raise Refused(HTTPStatus.CONFLICT, "already learning; wait for it to finish")
            if len(self.rows()) < 2:
                raise Refused(HTTPStatus.UNPROCESSABLE_ENTITY, "correct at least 2 readings first (one is held out "
                              "to check what was learned)")  # fmt: skip
            command = [sys.executable, str(Path(__file__).with_name("train.py")), "--data", str(self.folder),
                       "--init-from", str(self.start), "--workdir", str(self.workdir), "--no-resume"]  # fmt: skip
            command += self.train_flags + (["--epochs", str(self.epochs)] if self.epochs else [])
            quiet = os.environ | {"PYTHONUNBUFFERED": "1"}
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       stdin=subprocess.DEVNULL, env=quiet)  # fmt: skip
            self.state, self.progress, self.message = "learning", 0.0, "starting train.py"
        threading.Thread(target=self._follow, args=(process,), daemon=True).start()

    def _follow(self, process: subprocess.Popen) -> None:
        """train.py's lines → progress; its end → the adapted model (or why not)."""
        epochs, epoch, last = self.epochs or FINE_TUNING["epochs"], 0, ""
        for line in process.stdout:
            line = line.strip()
            last = line or last
            if found := re.match(r"Epoch (\d+)/(\d+)", line):
                epoch, epochs = int(found[1]), int(found[2])
            elif found := re.match(r"(\d+)/(\d+) - ", line):
                self.progress = (epoch - 1 + int(found[1]) / int(found[2])) / epochs
                self.message = f"epoch {epoch} of {epochs}"
        if process.wait() != 0:
            self.state, self.message = "failed", last.removeprefix("train.py: error: ")
            return
        self.message = "loading the adapted model"
        try:
            reader = Reader.load(self.workdir / "model.h5")
            compile_shapes(reader, self.batcher.max_batch)
        except (OSError, ValueError) as error:
            self.state, self.message = "failed", str(error)
            return
        with self.lock:
            self.before, self.batcher.reader = self.batcher.reader, reader
            self.state, self.progress, self.message = "learned", 1.0, ""

    def back(self) -> None:
        """Reads with the model before (state "before"), or again with the one after ("learned")."""
        with self.lock:
            if self.before is None:
                raise Refused(HTTPStatus.CONFLICT, "there is no model before this one to go back to")
            self.batcher.reader, self.before = self.before, self.batcher.reader
            self.state = "before" if self.state == "learned" else "learned"

    def status(self) -> dict:
        return {
            "corrections": len(self.rows()), "folder": str(self.folder), "state": self.state,
            "progress": round(self.progress, 3), "message": self.message,
            "model": self.batcher.reader.model.description,
            "before": None if self.before is None else self.before.model.description,
        }  # fmt: skip


def make_handler(batcher: Batcher, page: bytes, learner: Learner | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a client's requests share one connection
        server_version = "digitseq-demo"
        timeout = BODY_SECONDS  # a client that stops sending frees its thread

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            try:
                if self.path in ("/", "/index.html"):
                    self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
                elif self.path == "/api/model":
                    self._json(HTTPStatus.OK, describe(batcher.reader))
                elif self.path == "/api/learn":
                    self._json(HTTPStatus.OK, self._learner().status())
                else:
                    raise Refused(HTTPStatus.NOT_FOUND, f"no such page: {self.path}; the page is /")
            except Refused as refused:
                self._error(refused)

        def do_POST(self) -> None:  # noqa: N802
            try:
                url = urlsplit(self.path)
                if url.path in ("/api/correct", "/api/learn", "/api/back"):
                    return self._learning(url.path, parse_qs(url.query))
                if self.path != "/api/read":
                    raise Refused(HTTPStatus.NOT_FOUND, f"no such call: POST {self.path}; images go to /api/read")
                started = time.perf_counter()
                body = self._body()
                try:
                    prepared = batcher.reader.prepare(body)
                except ImageFileError as error:
                    raise Refused(HTTPStatus.UNPROCESSABLE_ENTITY, str(error)) from None
                if not prepared.any():
                    raise Refused(HTTPStatus.UNPROCESSABLE_ENTITY, "nothing to read: the image has no ink on it")
                answer = reading_json(batcher.read(prepared))
                answer["milliseconds"] = round((time.perf_counter() - started) * 1000, 1)
                self._json(HTTPStatus.OK, answer)
            except Refused as refused:
                self._error(refused)
            except Exception as error:  # a bug must not take the server down: the request gets it
                print(f"{PROG}: error reading a request: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
                self._error(Refused(HTTPStatus.INTERNAL_SERVER_ERROR, f"the server failed to read it ({error})"))

        def _learner(self) -> Learner:
            if learner is None:
                raise Refused(HTTPStatus.NOT_FOUND, "this server keeps no corrections (started without a folder)")
            return learner

        def _learning(self, path: str, query: dict) -> None:
            """POST /api/correct?digits=D (the picture's bytes), /api/learn, /api/back: the learner's status."""
            learner = self._learner()
            if path == "/api/correct":
                learner.correct(self._body(), query.get("digits", [""])[0].strip())
            elif path == "/api/learn":
                learner.learn()
            else:
                learner.back()
            self._json(HTTPStatus.OK, learner.status())

        def do_PUT(self) -> None:  # noqa: N802
            self._error(Refused(HTTPStatus.METHOD_NOT_ALLOWED, "only GET (the page) and POST /api/read are served"))

        do_DELETE = do_PATCH = do_PUT  # noqa: N815

        def _body(self) -> bytes:
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise Refused(HTTPStatus.LENGTH_REQUIRED, "send the image file's bytes with a Content-Length")
            if int(length) > MAX_BODY:
                self.close_connection = True  # its body is never read
                raise Refused(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"the image is {int(length) / 2**20:.1f} MB, more than the {MAX_BODY // 2**20} MB read here; "
                    "send a smaller one",
                )
            try:
                return self.rfile.read(int(length))
            except TimeoutError:
                self.close_connection = True
                raise Refused(HTTPStatus.REQUEST_TIMEOUT, f"the image did not arrive within {BODY_SECONDS} s") from None

        def _json(self, status: HTTPStatus, content: dict) -> None:
            self._send(status, json.dumps(content).encode(), "application/json")

        def _error(self, refused: Refused) -> None:
            self._json(refused.status, {"error": str(refused)})

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Security-Policy", POLICY)
            self.send_header("Cache-Control", "no-store")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            pass  # one line per request would bury the address; errors are answered, 500s printed

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a connection left open does not hold up Ctrl-C

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError):  # a client that went away is no news
            print(f"{PROG}: error serving {client_address[0]}: {type(error).__name__}: {error}", file=sys.stderr)


def serve(
    reader: Reader, host: str = "127.0.0.1", port: int = 8000, max_batch: int = MAX_BATCH,
    learning: tuple | None = None,
) -> Server:  # fmt: skip
    """The page's server, bound but not yet serving (call serve_forever); its batcher as `.batcher`. With
    `learning` (Learner's arguments after the batcher: the model's path, the corrections folder, the epochs of
    learning, train.py's further flags), the page keeps corrections and learns from them (`.learner`)."""
    batcher = Batcher(reader, max_batch)
    learner = None if learning is None else Learner(batcher, *learning)
    try:
        server = Server((host, port), make_handler(batcher, PAGE.read_bytes(), learner))
    except OSError as error:
        if error.errno == 98:  # EADDRINUSE
            raise ValueError(f"port {port} on {host} is in use (another demo.py?); pick another with --port") from None
        raise ValueError(f"cannot serve on {host} port {port}: {error.strerror or error}") from None
    server.batcher, server.learner = batcher, learner
    compile_shapes(reader, max_batch)
    return server


def compile_shapes(reader: Reader, max_batch: int) -> None:
    """Compiled now, not while requests wait: every batch shape the batcher can meet (powers of two)."""
    blank = np.zeros(reader.model.image_size, np.uint8)
    for size in (1 << i for i in range((max_batch - 1).bit_length() + 1)):
        reader.read_prepared([blank] * size)


def address(server: Server) -> str:
    host, port = server.server_address[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


# --- python demo.py --benchmark ---------------------------------------------------------------------


def benchmark_images(args: argparse.Namespace, positions: int, count: int = 64) -> list[bytes]:
    """Numbers of MNIST test digits as a canvas sends them: dark ink on white, 4× the model's size, PNG."""
    from pipeline.mnist import load_pool
    from pipeline.sequences import SequenceConfig, fixed_set

    pool = load_pool("test", args.data_dir, args.mnist_dir)
    images, _ = fixed_set(pool, SequenceConfig(positions, layout="free"), count, seed=1)
    canvases = [Image.fromarray(255 - image) for image in images]
    return [png_bytes(c.resize((c.width * 4, c.height * 4), Image.Resampling.BILINEAR)) for c in canvases]


def load(server: Server, files: list[bytes], expected: list[dict], clients: int, requests: int) -> dict:
    """`clients` threads, each sending `requests` images in turn on one connection; every answer checked
    against `expected` (the reading of the same file by Reader.read alone)."""
    latencies: list[float] = []
    failures: list[str] = []
    wrong = 0
    lock = threading.Lock()
    host, port = server.server_address[:2]

    def client(number: int) -> None:
        nonlocal wrong
        connection = HTTPConnection(host, port, timeout=120)
        for i in range(requests):
            which = (number * requests + i) % len(files)
            started = time.perf_counter()
            try:
                connection.request("POST", "/api/read", files[which], {"Content-Type": "image/png"})
                response = connection.getresponse()
                body = response.read()
            except OSError as error:
                with lock:
                    failures.append(f"{type(error).__name__}: {error}")
                connection = HTTPConnection(host, port, timeout=120)
                continue
            seconds = time.perf_counter() - started
            with lock:
                if response.status != HTTPStatus.OK:
                    failures.append(f"{response.status}: {body[:200]!r}")
                    continue
                latencies.append(seconds)
                answer = json.loads(body)
                same = answer["digits"] == expected[which]["digits"] and all(
                    abs(a["probability"] - b["probability"]) <= 1e-3
                    for got, want in zip(answer["positions"], expected[which]["positions"], strict=True)
                    for a, b in zip(got["candidates"], want["candidates"], strict=True)
                )
                wrong += not same
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    milliseconds = np.array(latencies) * 1000
    return {
        "requests": clients * requests,
        "failed": len(failures),
        "first_failure": failures[0] if failures else None,
        "wrong": wrong,
        "p50_ms": round(float(np.percentile(milliseconds, 50)), 1) if latencies else None,
        "p95_ms": round(float(np.percentile(milliseconds, 95)), 1) if latencies else None,
        "requests_per_s": round(len(latencies) / seconds, 1),
    }


def benchmark(reader: Reader, args: argparse.Namespace) -> int:
    files = benchmark_images(args, reader.model.network.positions)
    expected = [reading_json(reading) for reading in reader.read(files)]
    print(f"{args.clients} clients × {args.requests} requests of {len(files)} numbers of MNIST test digits "
          f"(PNG, {Image.open(io.BytesIO(files[0])).size[0]} px wide), on {cpu_name()}", flush=True)  # fmt: skip
    results = {}
    for name, max_batch in (("batched", MAX_BATCH), ("one at a time", 1)):
        server = serve(reader, "127.0.0.1", 0, max_batch)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        load(server, files[:8], expected, 2, 2)  # warm-up: the connections, the first answers
        server.batcher.batch_sizes.clear()
        result = load(server, files, expected, args.clients, args.requests)
        server.shutdown()
        server.server_close()
        sizes = server.batcher.batch_sizes
        result["mean_batch"] = round(sum(sizes) / max(len(sizes), 1), 2)
        results[name.replace(" ", "_")] = result
        print(f"  {name:>13}: {result['p50_ms']} ms p50, {result['p95_ms']} ms p95, {result['requests_per_s']} "
              f"requests/s (batches of {result['mean_batch']} on average); {result['failed']} failed, "
              f"{result['wrong']} not as Reader.read reads them alone", flush=True)  # fmt: skip
    print(json.dumps({"clients": args.clients, "requests_each": args.requests, "cpu": cpu_name(), **results}))
    failed = any(result["failed"] or result["wrong"] for result in results.values())
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = flags.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model", nargs="?", type=Path, default=DEFAULT_MODEL, metavar="MODEL",
        help=f"a train.py workdir (its latest checkpoint) or a model.h5 (default: {DEFAULT_MODEL})",
    )  # fmt: skip
    parser.add_argument("--port", type=flags.whole_number, default=8000, help="the port to serve on (default: 8000; "
                        "0: any free one)")  # fmt: skip
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="the address to serve on (default: 127.0.0.1, this machine only; 0.0.0.0: every machine that can "
        "reach this one — the page has no login)",
    )  # fmt: skip
    parser.add_argument(
        "--corrections", type=Path, metavar="DIR",
        help="where the page keeps the readings corrected on it, a labelled folder (docs/own-numbers.md) that "
        "\"learn my hand\" fine-tunes the model on (default: corrections/ beside the model; the adapted model "
        "trains in learned/ beside it)",
    )  # fmt: skip
    parser.add_argument(
        "--learn-epochs", type=flags.positive_int, metavar="N",
        help=f"epochs of 100 steps that \"learn my hand\" trains (default: {FINE_TUNING['epochs']}, train.py's "
        "fine-tuning recipe)",
    )  # fmt: skip
    group = parser.add_argument_group("--benchmark")
    group.add_argument("--benchmark", action="store_true", help="serve, send it numbers of MNIST test digits from "
                       "several clients at once, print latency and throughput (JSON last line), stop")  # fmt: skip
    group.add_argument("--clients", type=flags.positive_int, default=8, help="clients at once (default: 8)")
    group.add_argument("--requests", type=flags.positive_int, default=50, help="requests each (default: 50)")
    flags.add_data_flags(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int | None:
    args = parse_args(argv)
    if args.port > 65535:
        raise ValueError(f"--port must be at most 65535, not {args.port}")
    if not args.model.exists():
        hint = "train one (python train.py)" if args.model == DEFAULT_MODEL else "name a workdir or a model.h5"
        raise ValueError(f"no model at {args.model}: {hint}")
    reader = Reader.load(args.model)
    if args.benchmark:
        return benchmark(reader, args)
    beside = args.model if args.model.is_dir() else args.model.parent
    corrections = args.corrections or beside / "corrections"
    mnist = [f"--{name.replace('_', '-')}={value}" for name in ("mnist_dir", "data_dir")
            if (value := getattr(args, name))]  # fmt: skip
    server = serve(reader, args.host, args.port, learning=(args.model, corrections, args.learn_epochs, mnist))
    try:
        local = ipaddress.ip_address(server.server_address[0]).is_loopback
    except ValueError:
        local = False
    print(f"{PROG}: reading with {reader.model.description}; corrections kept in {corrections}", flush=True)
    print(f"{PROG}: open {address(server)} (Ctrl-C stops it)", flush=True)
    if not local:
        print(f"{PROG}: note: serving every machine that can reach {args.host}; the page has no login", flush=True)
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # how a server is stopped: not a failure
            print(f"{PROG}: stopped", flush=True)
    return 0


if __name__ == "__main__":
    flags.exit_with(main, PROG)
