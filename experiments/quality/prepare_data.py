"""Build the byte-level code corpus of the quality study from Debian's Linux kernel source (offline).

    apt-get install linux-source-6.1        # once: /usr/src/linux-source-6.1.tar.xz
    python experiments/quality/prepare_data.py

Takes the C sources and headers (files over 256 KB, mostly generated
tables, are left out) in path order and splits them by file: one file in 20
(by a hash of its path) is held out for validation and retrieval filler, the
rest is training text. Writes ``data/train.bin.xz`` (``--train-mb`` of raw
bytes) and ``data/val.bin.xz`` beside this script; the GPU run unpacks them.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--train-mb", type=float, default=100.0)
    parser.add_argument("--val-mb", type=float, default=6.0)
    parser.add_argument("--out", type=Path, default=HERE / "data")
    args = parser.parse_args()
    if not args.source.exists():
        raise SystemExit(f"{args.source} not found: apt-get install linux-source-6.1")
    limits = {"train": int(args.train_mb * 1e6), "val": int(args.val_mb * 1e6)}
    parts = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    with tarfile.open(args.source) as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith((".c", ".h")) or member.size > 256 * 1024:
                continue
            split = "val" if int(hashlib.sha1(member.name.encode()).hexdigest(), 16) % 20 == 0 else "train"
            if sizes[split] >= limits[split]:
                if all(sizes[s] >= limits[s] for s in sizes):
                    break
                continue
            text = tar.extractfile(member).read()
            parts[split].append(text)
            sizes[split] += len(text) + 1
    args.out.mkdir(parents=True, exist_ok=True)
    for split, texts in parts.items():
        data = b"\n".join(texts)[: limits[split]]
        (args.out / f"{split}.bin.xz").write_bytes(lzma.compress(data, preset=6))
        print(f"{split}: {len(texts)} files, {len(data) / 1e6:.1f} MB -> {(args.out / f'{split}.bin.xz').stat().st_size / 1e6:.1f} MB xz")


if __name__ == "__main__":
    main()
