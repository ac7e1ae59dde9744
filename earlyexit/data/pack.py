"""Carry a training run's tokenized corpus to a machine that cannot build it (a lent GPU machine: other packages
installed, so `earlyexit.data.corpus` would read another corpus there, and no network).

    python -m earlyexit.data.pack pack WORK_DIR PACK.tar.xz      # here, after train_lm has prepared WORK_DIR
    python -m earlyexit.data.pack unpack PACK.tar.xz WORK_DIR    # there; then train_lm with work_dir=WORK_DIR

The pack is what `train_lm.prepare_data` leaves in a work_dir: the tokenizer, corpus.json, each split's token stream
and file list, xz-compressed (the default model's 110 MB of token caches pack into 24.6 MiB, in 1.7 minutes on two
cores), with a manifest of each file's SHA-256. Unpacking (8 s) checks every file against the manifest, so the run
there trains on exactly the tokens prepared here.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

from ..config import exit_code
from ..errors import EarlyExitError
from .corpus import SPLITS

MANIFEST = "manifest.json"


def packed_files(work: Path) -> list[Path]:
    """The work_dir's files a run needs to train without reading the corpus, relative to it."""
    names = [Path("corpus.json"), *(Path(f"{kind}_{s}.{ext}") for s in SPLITS for kind, ext in (("tokens", "npy"), ("files", "txt")))]
    tokenizer = sorted(p.relative_to(work) for p in (work / "tokenizer").glob("*") if p.is_file())
    missing = [str(n) for n in names if not (work / n).is_file()] + ([] if tokenizer else ["tokenizer/"])
    if missing:
        raise EarlyExitError(f"{work} lacks {', '.join(missing)}: run train_lm there first (it prepares the corpus)")
    return names + tokenizer


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pack(work: Path, out: Path, preset: int = 6) -> dict[str, str]:
    """Write `out` (tar.xz) from `work`; returns the manifest (relative path -> SHA-256)."""
    files = packed_files(work)
    manifest = {str(f): sha256(work / f) for f in files}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz", preset=preset) as tar:
        body = json.dumps(manifest, indent=2).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
        for f in files:
            tar.add(work / f, arcname=str(f))
    return manifest


def unpack(pack_path: Path, work: Path) -> dict[str, str]:
    """Extract `pack_path` into `work` and check every file against its manifest; returns the manifest."""
    if not pack_path.is_file():
        raise EarlyExitError(f"no corpus pack at {pack_path}")
    try:
        with tarfile.open(pack_path, "r:xz") as tar:
            member = tar.extractfile(MANIFEST)
            if member is None:
                raise KeyError(MANIFEST)
            manifest = json.loads(member.read())
            unexpected = [m.name for m in tar.getmembers() if m.name != MANIFEST and m.name not in manifest]
            if unexpected:
                raise EarlyExitError(f"{pack_path} holds files its manifest does not list: {', '.join(unexpected[:3])}")
            work.mkdir(parents=True, exist_ok=True)
            tar.extractall(work, members=[tar.getmember(name) for name in manifest], filter="data")
    except (tarfile.TarError, EOFError, KeyError, json.JSONDecodeError, OSError) as e:  # lzma errors are OSErrors
        raise EarlyExitError(f"{pack_path} is not a readable corpus pack ({type(e).__name__}: {e})") from None
    changed = [name for name, digest in manifest.items() if sha256(work / name) != digest]
    if changed:
        raise EarlyExitError(f"{pack_path}: {', '.join(changed)} do not match the manifest (a corrupt pack)")
    return manifest


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="WORK_DIR -> PACK.tar.xz")
    p.add_argument("work_dir", type=Path)
    p.add_argument("pack", type=Path)
    u = sub.add_parser("unpack", help="PACK.tar.xz -> WORK_DIR")
    u.add_argument("pack", type=Path)
    u.add_argument("work_dir", type=Path)
    args = parser.parse_args(argv)

    def run():
        if args.command == "pack":
            pack(args.work_dir, args.pack)
            print(f"wrote {args.pack} ({args.pack.stat().st_size / 2**20:.1f} MiB)")
        else:
            manifest = unpack(args.pack, args.work_dir)
            print(f"unpacked {len(manifest)} files into {args.work_dir}, each matching the manifest")

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
