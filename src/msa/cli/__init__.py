"""The ``msa`` command-line tool."""

from __future__ import annotations

import argparse

from msa.cli import bench, generate, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msa", description="MiniMax Sparse Attention tools")
    commands = parser.add_subparsers(dest="command", required=True)
    bench.add_parser(commands)
    generate.add_parser(commands)
    train.add_parser(commands)
    args = parser.parse_args(argv)
    return args.run(args)
