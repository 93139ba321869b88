"""``calofm pull ORG/NAME[@REV]``: a model or adapter (and an adapter's base) from the Hugging Face Hub, checked."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", metavar="ORG/NAME[@REV]", help="model or adapter repo (a branch, tag or commit after @)")
    p.add_argument("--revision", metavar="REV", help="branch, tag or commit (same as @REV)")
    p.add_argument("--out", metavar="DIR",
                   help="download into this new folder (default: the Hugging Face cache, where calofm.load finds it)")


def run(args: argparse.Namespace) -> int:
    from calofm.hub.push import describe, pull

    folder = pull(args.repo, revision=args.revision, out=args.out)
    print(f"{args.repo}: {describe(folder)}")
    print(f"in {folder}")
    return 0
