"""`python -m tf_zero.checkpoint consolidate ... | check ... | clean ...`."""

from __future__ import annotations

import sys

from tf_zero.checkpoint.consolidate import consolidate, load_model_factory
from tf_zero.checkpoint.parallel import check
from tf_zero.fault import debris


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tf_zero.checkpoint",
                                     description="Tools for tf_zero checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="write a checkpoint's model weights as one Keras "
                       ".weights.h5 file, one tensor at a time")
    c.add_argument("checkpoint", help="checkpoint prefix (e.g. ckpt/ckpt-3)")
    c.add_argument("output", help="the .weights.h5 file to write")
    c.add_argument("--model", required=True,
                   help="the model: a .keras file, module:function or file.py:function")
    c.add_argument("--root", default="model",
                   help="the name the model was saved under: Checkpoint(model=...) (default)")
    k = sub.add_parser("check", help="check that every data file is present, complete and "
                       "of this save (every entry is read once: its checksum is checked)")
    k.add_argument("checkpoint", help="checkpoint prefix")
    d = sub.add_parser("clean", help="remove the staging directories and temporary files "
                       "that killed saves left in a checkpoint or backup directory (run it "
                       "while no job is saving there)")
    d.add_argument("directory")
    d.add_argument("--dry-run", action="store_true", help="list them, remove nothing")
    args = parser.parse_args(argv)
    if args.command == "clean":
        found = debris.leftovers(args.directory) if args.dry_run else debris.sweep(args.directory)
        for path in found:
            print(f"{'would remove' if args.dry_run else 'removed'} {path}")
        print(f"{args.directory}: {len(found)} left by killed saves"
              f"{' (nothing removed)' if args.dry_run else ''}")
        return 0
    if args.command == "check":
        check(args.checkpoint, full=True)
        print(f"{args.checkpoint}: complete")
        return 0
    count = consolidate(args.checkpoint, args.output, load_model_factory(args.model), args.root)
    print(f"wrote {count} weights to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
