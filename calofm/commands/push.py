"""``calofm push DIR --repo-id ORG/NAME``: a model, full fine-tune or LoRA adapter folder to the Hugging Face Hub."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", metavar="DIR",
                   help="model folder (config.json + model.safetensors) or LoRA adapter folder")
    p.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="the Hub repo to upload to (created if new)")
    p.add_argument("--private", action="store_true", help="create the repo as private (an existing repo keeps its "
                                                          "visibility)")
    p.add_argument("--revision", metavar="BRANCH", help="upload to this branch (created from main if new)")
    p.add_argument("--commit-message", metavar="MSG", help="default: 'Upload calofm model' / 'adapter'")
    p.add_argument("--base-repo", metavar="ORG/NAME[@REV]",
                   help="adapter or fine-tune: the Hub repo of its base model (required when the base was a "
                        "local folder)")
    p.add_argument("--metrics", nargs="+", default=[], metavar="FILE",
                   help="metrics.json of calofm evaluate for the model card's evaluation table")


def run(args: argparse.Namespace) -> int:
    from calofm.hub.push import published_base, push

    url = push(args.folder, args.repo_id, private=args.private, revision=args.revision,
               commit_message=args.commit_message, base_repo=args.base_repo, metrics=args.metrics)
    where = f"{args.repo_id}@{args.revision}" if args.revision else args.repo_id
    print(f"uploaded {args.folder} to {where}: {url}")
    base = published_base(args.folder, args.base_repo)
    if base:
        print(f"its base model: {base} (fetched and checked against the adapter's fingerprint when it loads)")
    print(f"load with: calofm.load('{where}') or calofm generate --model {where} ...")
    return 0
