"""The first import of every command (train.py, eval.py, predict.py, export.py, benchmark.py).

Ctrl-C while the libraries load (seconds) ends the command quietly, with status 130 and no
traceback; `pipeline.flags.run` hands Ctrl-C back to Python once the command itself starts. And
`pipeline` is imported first: it configures TensorFlow (logging, threads, no accelerators)
before anything else loads it.
"""

import os
import signal
import threading

if threading.current_thread() is threading.main_thread():  # (imported by a test, it may not be)
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import pipeline  # noqa: E402, F401
