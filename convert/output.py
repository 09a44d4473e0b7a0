"""Where a converted GGUF may be written, and putting it there without harm.

A GGUF is written under a temporary name beside its destination and published at the end,
so a failure never leaves a half-written file under the final name. Publishing replaces
only a regular file, and only when asked (``--force``): never a folder, a symlink, a fifo
or a device (as root, renaming over ``/dev/full`` would turn the device into a file).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from lfm2edge.runtime.core.errors import ConversionError, InvalidInputError


def check_output(path: Path, force: bool) -> None:
    """Refuse an output path that convert must not write, before any work is done."""
    if not path.parent.is_dir():
        raise InvalidInputError(f"the output folder {path.parent} does not exist")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConversionError(f"cannot inspect the output path {path}: {e.strerror}") from e
    if stat.S_ISDIR(mode):
        raise ConversionError(f"the output {path} is a folder; give the GGUF file's path, e.g. {path / 'model.gguf'}")
    if stat.S_ISLNK(mode):
        raise ConversionError(
            f"the output {path} is a symbolic link; lfm2edge replaces only regular files: remove the link or "
            "choose another path"
        )
    if not stat.S_ISREG(mode):
        raise ConversionError(
            f"the output {path} is not a regular file (a device, fifo or socket); lfm2edge replaces only "
            "regular files: choose another path"
        )
    if not force:
        raise ConversionError(
            f"the output {path} already exists; pass --force (lfm2edge.convert_checkpoint(..., force=True)) "
            "to replace it"
        )


def publish(tmp: Path, path: Path, force: bool) -> None:
    """Move the finished ``tmp`` to ``path``; the checks run again, minutes may have passed."""
    check_output(path, force)
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails rather than replace whatever appeared meanwhile
    except FileExistsError:
        raise ConversionError(f"the output {path} appeared while converting; pass --force to replace it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        os.replace(tmp, path)  # a filesystem without hard links: checked just above
    else:
        tmp.unlink()
