"""The error surface every launcher shares: `run(main)` instead of `absl.app.run(main)`.

An expected failure (`autoshard_jax.errors.is_user_error`) ends with one line on stderr,
`error: <what is wrong, where, what to do>`, and exit status 2; its traceback goes to
`<workdir>/error.log` when the launcher has a `--workdir` (to the terminal under `--traceback`).
Any other exception is a bug and keeps its full traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from absl import app, flags, logging

from autoshard_jax.errors import check_local_dir, is_user_error

FLAGS = flags.FLAGS
flags.DEFINE_bool("traceback", False, "Print the full traceback of expected errors too.")

EXIT_USER_ERROR = 2
ERROR_LOG = "error.log"


def _log_traceback(exc: BaseException) -> str | None:
    """Writes the traceback to <workdir>/error.log; returns the path, or None if not writable."""
    workdir = FLAGS["workdir"].value if "workdir" in FLAGS else None
    if not workdir or "://" in workdir:
        return None
    path = os.path.join(workdir, ERROR_LOG)
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(path, "a") as f:
            traceback.print_exception(exc, file=f)
    except OSError:
        return None
    return path


def one_line(exc: BaseException) -> str:
    """The error's message on a single line (multi-line messages are joined)."""
    if isinstance(exc, OSError) and exc.filename:
        text = f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc)
    joined = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return joined or type(exc).__name__


def guarded(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
    """Wraps a launcher's main so expected failures exit with one named line."""

    def wrapped(argv: list[str]) -> object:
        try:
            if "workdir" in FLAGS and FLAGS["workdir"].value:
                check_local_dir(FLAGS["workdir"].value)
            return main(argv)
        except Exception as exc:  # noqa: BLE001 - sorted into expected / unexpected below
            if not is_user_error(exc) or FLAGS.traceback:
                raise
            log = _log_traceback(exc)
            where = f" (traceback in {log})" if log else ""
            _last_words(f"error: {one_line(exc)}{where}\n", log)

    return wrapped


def _last_words(line: str, log: str | None) -> None:
    """Prints `line` as the last thing on stderr and exits with EXIT_USER_ERROR.

    Threads of half-finished library work (orbax / tensorstore reading a corrupt checkpoint)
    may still print tracebacks, also at interpreter shutdown; from here on fd 2 goes to the log
    (or /dev/null), the line goes to the real stderr, and the process exits without shutdown.
    A thread may have left half a line on fd 2 before the switch (C++ threads of tensorstore
    print asyncio tracebacks piece by piece, and `threading` does not see them), so the line
    always starts on a fresh one. Everything the job writes is flushed by the time its error
    reaches here.
    """
    line = "\n" + line
    sys.stdout.flush()
    real_stderr = os.dup(2)
    try:
        sink = os.open(log or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(sink, 2)
    except OSError:
        pass
    # After the switch: a half line a finished thread left in sys.stderr's buffer (a traceback's
    # indent) goes to the log, not in front of the line.
    sys.stderr.flush()
    os.write(real_stderr, line.encode())
    os._exit(EXIT_USER_ERROR)


def run(main: Callable[[list[str]], object]) -> None:
    """`absl.app.run` with the project's error surface."""
    app.run(guarded(main))


def define_distributed_flags() -> None:
    """The flags of a multi-process (multi-host) job; call at import, before flags are parsed."""
    flags.DEFINE_bool("jax_distributed", False,
                      "Call jax.distributed.initialize() with auto-detected settings (Cloud TPU, "
                      "SLURM, ...).")
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0's coordinator; with --num_processes and "
                        "--process_id, starts a multi-process run (jax.distributed.initialize).")
    flags.DEFINE_integer("num_processes", None, "Processes of the multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
    flags.DEFINE_integer("heartbeat_timeout_s", None,
                         "Seconds after which the processes of a run give up on a silent peer "
                         "(jax.distributed's default if unset).")


def initialize_distributed() -> None:
    """`jax.distributed.initialize` from the flags of `define_distributed_flags`, if asked for.

    Call before any JAX computation. Without --jax_distributed or --coordinator_address the
    job stays a single process. On CPU, cross-process collectives use gloo.
    """
    import jax  # imported here: most launchers never call this

    given = {name: FLAGS[name].value for name in ("coordinator_address", "num_processes",
                                                  "process_id")}
    if not FLAGS.jax_distributed and given["coordinator_address"] is None:
        if given["num_processes"] is not None or given["process_id"] is not None:
            raise app.UsageError("--num_processes / --process_id need --coordinator_address")
        return
    kwargs = {k: v for k, v in given.items() if v is not None}
    if FLAGS.heartbeat_timeout_s is not None:
        kwargs["heartbeat_timeout_seconds"] = FLAGS.heartbeat_timeout_s
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info("JAX process %d of %d", jax.process_index(), jax.process_count())


def define_clock_flag() -> None:
    """--clock of the launchers that time programs with the cost oracle."""
    flags.DEFINE_enum("clock", "auto", ["auto", "wall", "cpu"],
                      "Timing clock; auto = cpu (process CPU time, pinned to one core) on the "
                      "CPU backend, wall on accelerators.")


def define_spmd_every_device_flag() -> None:
    """--spmd_every_device of the launchers that time plans' SPMD steps with the oracle."""
    flags.DEFINE_bool("spmd_every_device", True, "A plan's spmd compute is every device's "
                      "padded program timed, the slowest taken; --nospmd_every_device times "
                      "the busiest device's by ids x width alone, as costs before session 33 "
                      "were (D times less timing; see cost.oracle.measure_plan).")


def timing_clock() -> str:
    """--clock resolved: on CPU, this process's CPU time on one pinned core (see cost/timing)."""
    if FLAGS.clock != "auto":
        return FLAGS.clock
    import jax

    return "cpu" if jax.default_backend() == "cpu" else "wall"


def int_list(name: str, values: list[str]) -> tuple[int, ...]:
    """A list flag's values as ints, or a ConfigError naming the flag."""
    from autoshard_jax.errors import ConfigError
    try:
        return tuple(int(v) for v in values)
    except ValueError as e:
        raise ConfigError(f"--{name} must be integers, got {values}") from e
