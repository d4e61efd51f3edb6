"""`python -m mlx_engine_server.cli.engine_process --fd N`: the engine process the server starts.

Not for people to run: the server spawns it with one end of a socket pair as file descriptor N.
"""

from __future__ import annotations

import argparse
import sys
from multiprocessing.connection import Connection

from ..engine.process_main import serve_engine
from .logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx-engine-process")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="text")
    arguments = parser.parse_args(argv)
    configure_logging(arguments.log_level, arguments.log_format)
    return serve_engine(Connection(arguments.fd))


if __name__ == "__main__":
    sys.exit(main())
