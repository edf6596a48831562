"""Writes that a crash, a full disk or a file-size limit cannot leave half done.

Every file is written under a temporary name, fsynced, then renamed over its final name: a reader sees either
the old file or the new one, never a partial one, and a failed write removes its temporary file.
"""

import json
import os

from safetensors import SafetensorError

from errors import WriteError, one_line

TMP_SUFFIX = ".tmp"  # temporary files and checkpoint folders; never read as complete


def write_atomic(path, write):
    """Run write(tmp_path), fsync it, then rename over `path`: a crash leaves the old file or the new one.

    A failed write (disk full, file-size limit) removes the temporary file and raises WriteError naming it.
    """
    tmp = path + TMP_SUFFIX
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # some writers create 0600 files; caches are often shared
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a failed write as RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        raise WriteError(f"writing {path}: {one_line(e)}") from None
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_lines(path, lines):
    """Write `lines` (each with its newline) to `path` atomically."""

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(lines)

    write_atomic(path, write)


def write_json_atomic(path, obj):
    """Write `obj` as indented UTF-8 JSON to `path` atomically."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")

    write_atomic(path, write)


def make_dirs(path):
    """os.makedirs(path, exist_ok=True), a failure raised as WriteError naming `path`."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WriteError(f"creating {path}: {one_line(e)}") from None
