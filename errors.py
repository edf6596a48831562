"""The errors a run reports in one line, and `run_cli`, which reports them (`error: ...` on stderr, exit 2).
"""

import os
import signal
import sys

from tqdm import tqdm

from distributed import shutdown_distributed


class ConfigError(ValueError):
    """A config field is missing, unknown, of the wrong type or out of range."""


class CacheError(ValueError):
    """The trajectory cache is missing, stale or unreadable."""


class WriteError(RuntimeError):
    """A file could not be written: disk full, file-size limit, permissions."""


def one_line(error):
    """An exception's message on one line (library messages often span several)."""
    return " ".join(str(error).split())


def run_cli(main, argv):
    """main(argv), turning a bad config, cache or write into one line on stderr and exit status 2.

    A config error is the same on every rank and printed by rank 0; the others (a file one rank reads or
    writes, a non-finite value) are printed by each rank that meets them."""
    # past a file-size limit the write fails (EFBIG), not the process
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        main(argv)
    except (ConfigError, CacheError, FloatingPointError, WriteError) as e:
        rank = int(os.environ.get("RANK", "0"))
        # an open bar would redraw after the message at exit
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        if rank == 0 or not isinstance(e, ConfigError):
            print(f"error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        shutdown_distributed()
        sys.exit(2)
