"""``calofm card DIR``: write or refresh the model card (DIR/README.md) of a model, fine-tune or LoRA adapter folder."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="model folder, fine-tuned model folder or LoRA adapter folder")
    parser.add_argument("--repo-id", metavar="ORG/NAME", default=None,
                        help="the Hub repo the folder is published as: the card's usage snippet loads it from there "
                             "(default: the folder path)")
    parser.add_argument("--metrics", nargs="+", action="extend", default=[], metavar="FILE",
                        help="metrics.json of calofm evaluate for the evaluation table (several allowed)")
    parser.add_argument("--license", default="apache-2.0", metavar="ID",
                        help="license identifier in the card's metadata (default: apache-2.0)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from calofm.hub.modelcard import write_card

    if not args.license.strip():
        raise ValueError("--license: empty license identifier")
    path = write_card(Path(args.folder), repo_id=args.repo_id, metrics=[Path(m) for m in args.metrics],
                      license=args.license.strip())
    print(path)
    return 0
