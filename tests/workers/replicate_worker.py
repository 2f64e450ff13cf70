"""Subprocess worker for the replication's lock tests.

``python tests/workers/replicate_worker.py OUT`` runs ``advfeat replicate`` on planted data into OUT and, at its
first stage (the log line ``[standard] running``, so after it holds the folder), prints ``paused`` and waits
until stdin closes. The test then starts a second replication on OUT, and kills this one.
"""

from __future__ import annotations

import sys

from advfeat.replicate import replicate


def log(line: str) -> None:
    print(line, flush=True)
    if line == "[standard] running":
        print("paused", flush=True)
        sys.stdin.read()
        sys.exit(0)


if __name__ == "__main__":
    replicate(out=sys.argv[1], progress=False, log=log)
