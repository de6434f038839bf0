"""The `rnnscope` command line."""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn


def _cmd_compare(args) -> int:
    from .profile import compare

    torch.manual_seed(args.seed)
    I, H = args.input_size, args.hidden_size
    models = {"RNN": nn.RNN(I, H, batch_first=True), "LSTM": nn.LSTM(I, H, batch_first=True),
              "GRU": nn.GRU(I, H, batch_first=True)}
    cmp = compare(models, seq_len=args.seq_len, samples=args.samples, seed=args.seed)
    print(cmp)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnnscope", description="Gradient flow through time in "
                                "recurrent networks.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="RNN vs LSTM vs GRU gradient flow")
    c.add_argument("--seq-len", type=int, default=100)
    c.add_argument("--hidden-size", type=int, default=128)
    c.add_argument("--input-size", type=int, default=64)
    c.add_argument("--samples", type=int, default=50)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_cmd_compare)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
