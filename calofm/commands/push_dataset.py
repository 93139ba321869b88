"""``calofm push-dataset FILE... --repo-id ORG/NAME``: shower files of one geometry to a Hugging Face Hub dataset
repo as Parquet shards (``data/<geometry>/``), with the detector card and a dataset card."""

from __future__ import annotations

import argparse

from calofm.commands.args import int_in


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="native shower files (.h5) of one geometry, concatenated in this order")
    p.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="the Hub dataset repo (created if new)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", metavar="BRANCH", help="upload to this branch (created from main if new)")
    p.add_argument("--commit-message", metavar="MSG", help="default: 'Upload calofm showers'")
    p.add_argument("--shard-rows", type=int_in(1, 10**7), default=10_000, metavar="N",
                   help="showers per Parquet shard (default 10000, about 100 MB)")


def run(args: argparse.Namespace) -> int:
    from calofm.hub.push import push_dataset

    url = push_dataset(args.files, args.repo_id, private=args.private, revision=args.revision,
                       commit_message=args.commit_message, shard_rows=args.shard_rows)
    where = f"{args.repo_id}@{args.revision}" if args.revision else args.repo_id
    print(f"uploaded {len(args.files)} file(s) to the dataset {where}: {url}")
    print(f"train on it with: calofm adapt --geometry GEOMETRY --data {where}")
    return 0
