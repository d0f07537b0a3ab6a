"""``densenet`` as torchrun starts it in tests, where process 1 may be made to differ (env vars):

DENSENET_TEST_SWAP="OLD=NEW": process 1 reads NEW wherever its command line says OLD, as if a file
    were missing, or different, on its node.
DENSENET_TEST_NO_WRITES=DIR: process 1 fails on any attempt to create, change or delete anything
    under DIR, which proves it leaves the outputs to process 0.
"""

import os
import sys

from densenet.cli import main

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
WROTE = 97
CHANGES = {"os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.truncate", "shutil.rmtree"}


def refuse_writes_under(root: str) -> None:
    root = os.path.realpath(root)

    def inside(path: object) -> bool:
        if isinstance(path, int):  # a file descriptor: checked when it was opened
            return False
        return os.path.realpath(os.fsdecode(path)).startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        opened_for_writing = event == "open" and args[2] & WRITE_FLAGS
        if (opened_for_writing or event in CHANGES) and inside(args[0]):
            # Exit at once: an exception could be caught and turned into something quieter.
            print(f"process 1 wrote: {event} {args[0]}", file=sys.stderr, flush=True)
            os._exit(WROTE)

    sys.addaudithook(hook)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if os.environ["RANK"] == "1":
        if "DENSENET_TEST_SWAP" in os.environ:
            old, new = os.environ["DENSENET_TEST_SWAP"].split("=", 1)
            argv = [new if arg == old else arg for arg in argv]
        if "DENSENET_TEST_NO_WRITES" in os.environ:
            refuse_writes_under(os.environ["DENSENET_TEST_NO_WRITES"])
    sys.exit(main(argv))
