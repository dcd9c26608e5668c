"""The first import of every command (train.py, eval.py, predict.py, export.py, benchmark.py).

Ctrl-C while the libraries load (seconds) ends the command quietly, with status 130 and no
traceback; `pipeline.flags.run` hands Ctrl-C back to Python once the command itself starts. And
`pipeline` is imported first: it configures TensorFlow (logging, threads, no accelerators)
before anything else loads it.

A crash is never silent: when the interpreter dies on a fatal signal (a segmentation fault in C++,
an abort), Python's faulthandler writes what every thread was doing into a pipe, and a small
watcher process beside the command saves it to a file — the workdir's crash.txt once the command
names one (`report_crashes_to`), else one in the temporary folder — and says so in one line on
stderr. A dying process can run no Python of its own, hence the watcher; it ignores the signals
a terminal sends the whole process group, and ends when the command ends.
"""

import faulthandler
import os
import signal
import subprocess
import sys
import tempfile
import threading

if threading.current_thread() is threading.main_thread():  # (imported by a test, it may not be)
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

# The watcher: reads the pipe to its end (the command's end, however it came). "\0PATH\n" names where a
# report goes; every other byte is faulthandler's report (which holds no NUL).
_WATCHER = r"""
import os, signal, sys
for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(number, signal.SIG_IGN)
prog, path = sys.argv[1], sys.argv[2]
fallback = path
report, rest = bytearray(), sys.stdin.buffer.read()
while rest:
    before, named, rest = rest.partition(b"\0")
    report += before
    if named:
        named, _, rest = rest.partition(b"\n")
        path = os.fsdecode(named)
if report.strip():
    try:
        with open(path, "wb") as file:
            file.write(report)
    except OSError:  # the workdir is gone or read-only: the temporary folder
        path = fallback
        with open(path, "wb") as file:
            file.write(report)
    first = report.decode(errors="replace").strip().splitlines()[0]
    cause = first.partition(": ")[2] if first.startswith("Fatal Python error") else "a fatal signal"
    sys.stderr.write(f"{prog}: crashed ({cause}); what each thread was doing is in {path}\n")
"""

_watcher: subprocess.Popen | None = None
_report_pipe: int | None = None


def _watch_for_crashes() -> None:
    global _watcher, _report_pipe
    prog = os.path.basename(sys.argv[0])
    fallback = os.path.join(tempfile.gettempdir(), f"{prog}-crash-{os.getpid()}.txt")
    read_end, _report_pipe = os.pipe()  # the write end is not inherited by the command's own children
    _watcher = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHER, prog, fallback], stdin=read_end,
                                stdout=subprocess.DEVNULL)  # fmt: skip
    os.close(read_end)
    faulthandler.enable(file=_report_pipe, all_threads=True)


def report_crashes_to(path: os.PathLike | str) -> None:
    """Where the report of a crash from here on goes (a command's workdir, once it is known)."""
    if _report_pipe is not None:
        os.write(_report_pipe, b"\0" + os.fsencode(path) + b"\n")


_command = getattr(sys.modules["__main__"], "__file__", None)
if _command and os.path.dirname(os.path.abspath(_command)) == os.path.dirname(os.path.abspath(__file__)):
    _watch_for_crashes()  # a command (train.py, …), not a test or a tool importing this

import pipeline  # noqa: E402, F401
