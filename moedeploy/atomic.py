"""Files written whole or not at all: what moedeploy writes for later runs to read (predictors, placements,
traces) goes to a temporary file beside its destination and is renamed over it once complete, so a reader
sees the old file or the whole new one, and a failure (an error, Ctrl-C, a full disk) leaves nothing behind."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from .errors import OutputError


@contextmanager
def replaced(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """`with replaced(path) as f: f.write(...)`: `path` is created or replaced when the block ends without error.
    The file gets the permissions `open` would give it (the umask applies). The system's refusals (no space, no
    permission) become an `OutputError` naming the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), mode) as f:
            yield f
        os.replace(tmp, path)
    except OSError as ex:
        tmp.unlink(missing_ok=True)
        if isinstance(ex, OutputError):
            raise
        raise OutputError(f"could not write {path}: {ex.strerror or ex}; nothing was written there (check the "
                          "folder's free space and permissions)") from ex
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
