"""prepare-data: fetch, verify and write one dataset in the prepared form (data/<dataset>/).

Outputs: data/<dataset>/{train.pt, test.pt, meta.json} (the format: vaepp/data.py; the sources:
acquire/datasets.py). Downloads are cached under $VAEPP_CACHE or ~/.cache/vaepp and shared by every
checkout and experiment; a dataset that cannot be had (offline, no registry source) stops the
stage with one line naming the remedy.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import get_args

from stages import cli
from stages.boot import boot


def _main(argv: list[str] | None) -> int:
    from vaepp.config import Dataset

    p = cli.parser(__doc__.splitlines()[0], run=False)
    p.add_argument("--dataset", required=True, choices=get_args(Dataset), help="dataset to prepare")
    p.add_argument("--out", required=True, type=Path, help="output directory, e.g. data/mnist")
    args = p.parse_args(argv)

    from vaepp.config import load_params

    load_params(args.params)  # a bad params file stops the pipeline here, before any download
    from acquire.datasets import prepare
    from vaepp.data import save_prepared

    t0 = time.perf_counter()
    log = None if args.no_progress else (lambda msg: print(msg, file=sys.stderr))
    train, test, meta = prepare(args.dataset, cli.cache_dir(), log=log)
    save_prepared(args.out, train, test, meta)
    print(
        f"{meta['label']}: {train.shape[0]} train / {test.shape[0]} test images "
        f"{tuple(train.shape[1:])} → {args.out} ({meta['source']}; {time.perf_counter() - t0:.1f} s)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    boot()
    return cli.guarded(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
