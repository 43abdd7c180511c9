"""``lightning-unlearn fuse OUT_DIR REQ_DIR1 REQ_DIR2 ...``: one set of EUL unlearning layers from several requests'
sets, in closed form (:func:`lightning_unlearn.models.adapters.fuse`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..models.adapters import fuse, load_adapter_set, save_adapter_set


def main(argv: Sequence[str] | None = None) -> None:
    """Fuse the EUL adapter sets of several deletion requests in closed form and write the result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", help="directory to write the fused unlearning_layers.safetensors to")
    parser.add_argument("requests", nargs="+", help="directories (or files) of the requests' adapter sets")
    parser.add_argument("--ridge", type=float, default=1e-6,
                        help="relative ridge pulling unseen directions to the mean weight; 0 for plain lstsq")
    args = parser.parse_args(argv)
    sets = [load_adapter_set(r) for r in args.requests]
    path = save_adapter_set(fuse(sets, args.ridge), args.out_dir)
    print(f"fused {len(sets)} adapter sets ({sum(s.tokens for s in sets)} tokens) into {path}")
