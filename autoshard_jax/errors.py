"""The project's error taxonomy: which failures are the user's to fix.

Library code raises an `InputError` (or a subclass) for anything a user can correct: bad flags or
config, bad data, bad tables or plans, a resume mismatch, a corrupt checkpoint. The message is one
line that says what is wrong, where (file and line, config key, checkpoint step) and what to do.
Launchers (`launch/common.py`) print that line and exit non-zero; any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import errno

# OS errors a user fixes by freeing space or fixing permissions, not by reading a traceback.
USER_OS_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                            errno.ENOENT, errno.ENOTDIR, errno.EISDIR})


class InputError(ValueError):
    """A failure the user can fix; the message names the culprit and the remedy."""


class ConfigError(InputError):
    """A config field out of range or inconsistent; the message names the config key."""


class DataError(InputError):
    """Data that cannot be read as asked (corrupt file, too little data); names file and line."""


class ResumeError(InputError):
    """A workdir whose checkpoints cannot be resumed by this run; names step, file or keys."""


def is_user_error(exc: BaseException) -> bool:
    """True for failures the user fixes (InputError, missing files, full disk, permissions)."""
    if isinstance(exc, InputError):
        return True
    # `FileNotFoundError("message")` has no errno; its class says what it is all the same.
    if isinstance(exc, (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)):
        return True
    return isinstance(exc, OSError) and exc.errno in USER_OS_ERRNOS


def check_range(key: str, value, *, low=None, high=None, integer: bool = False) -> None:
    """Raises ConfigError naming `key` unless low <= value <= high (and an int when asked)."""
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"config.{key} must be an integer, got {value!r}")
    if not integer and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"config.{key} must be a number, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"config.{key} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"config.{key} must be <= {high}, got {value!r}")


def check_local_dir(path: str, what: str = "workdir") -> None:
    """Output directories are written with local file operations; a URL would become a local
    directory named "gs:" (or "s3:"), so it is refused with what to do instead."""
    if "://" in path:
        raise ConfigError(f"{what} {path!r} is a URL; outputs are written with local file "
                          "operations: mount the bucket (e.g. gcsfuse) and pass the mounted path")
