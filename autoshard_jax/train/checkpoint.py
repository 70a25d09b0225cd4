"""Async orbax checkpoints of the training state plus a small JSON record, restored in place.

A checkpoint step holds two items: ``state`` (any pytree of jax arrays, sharded or not, numpy
arrays and Python scalars, written with ``StandardSave``) and ``meta`` (a small JSON dict: data
position, config name, rng seed, ...). Resuming restores ``state`` into the shapes, dtypes and
shardings of an abstract target, so a run continues bit-identically on the same mesh.

RNG keys: store new-style typed keys (``jax.random.key``) or their raw ``jax.random.key_data``;
orbax 0.12.8 writes typed keys as their uint32 key data and wraps them back on restore.

Ordering rule for the train loop: call ``save`` *before* the next jitted step that donates the
state's buffers. ``save`` returns once the device-to-host copy is scheduled; the runtime keeps the
buffers alive until it is done, and the file writes continue in the background.

Failures are one-line errors, never orbax's noise: a step that cannot be read (truncated or
missing array file, broken meta JSON) is a ``CheckpointCorruptError`` naming the step and file,
and ``restore_latest`` falls back past it to the newest intact step; a save that cannot be written
(disk full, permissions) is a ``CheckpointWriteError`` naming the path and the OS error, with the
partial step directory removed and the earlier steps untouched.
"""

from __future__ import annotations

import asyncio
import errno
import glob
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from autoshard_jax.errors import USER_OS_ERRNOS, InputError, ResumeError

__all__ = ["CheckpointCorruptError", "CheckpointWriteError", "Checkpointer", "abstract_state"]

log = logging.getLogger(__name__)

_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_ORBAX_DIR = os.path.dirname(ocp.__file__)
# How tensorstore reports an OS error inside an orbax write.
_TS_OS_ERROR = re.compile(r"os_error_code='(\d+)'")
_TS_FAILED_PATH = re.compile(r'Failed (?:writing|to open|to create)[^"]*"([^"]+)"')


class CheckpointCorruptError(ResumeError):
    """A checkpoint step that cannot be read; names the step and its file or directory."""

    def __init__(self, step: int, where: str, reason: str):
        super().__init__(f"checkpoint step {step} ({where}) cannot be read: {reason}")
        self.step, self.where, self.reason = step, where, reason


class CheckpointWriteError(InputError):
    """A checkpoint that could not be written (disk full, permissions); names path and error."""


def _innermost(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while (nxt := exc.__cause__ or exc.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        exc = nxt
    return exc


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _quiet_stranded_reads() -> None:
    """Keep what a failed orbax restore leaves behind out of the user's log.

    orbax runs a restore on an event loop that it closes without cancelling the other shards'
    reads. Those reads then print "Exception ignored in: ..." tracebacks whenever tensorstore's
    threads let go of them, possibly after the job's own error line (seen in CI): a read that
    completes calls back into the closed loop, and its coroutine, once collected, turns the
    GeneratorExit into the read's error. This wraps the unraisable hook (once) so that exactly
    those two are skipped; every other unraisable error reaches the hook as before.
    """
    if not getattr(sys.unraisablehook, "skips_stranded_reads", False):
        sys.unraisablehook = _skipping_stranded_reads(sys.unraisablehook)


def _is_stranded_read(unraisable: Any) -> bool:
    """A collected orbax coroutine, or a native thread's call into a closed event loop."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None:
        return code.co_filename.startswith(_ORBAX_DIR)
    tb = unraisable.exc_traceback
    if tb is None or tb.tb_frame.f_code.co_name != "call_soon_threadsafe":
        return False
    loop = tb.tb_frame.f_locals.get("self")
    return isinstance(loop, asyncio.AbstractEventLoop) and loop.is_closed()


def _skipping_stranded_reads(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    def skip(unraisable: Any) -> None:
        if not _is_stranded_read(unraisable):
            hook(unraisable)

    skip.skips_stranded_reads = True
    return skip


def _os_error(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, path) of the user-fixable OS error somewhere in an exception's chain, if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in USER_OS_ERRNOS:
            return exc.errno, exc.filename
        code = _TS_OS_ERROR.search(str(exc))
        if code and int(code.group(1)) in USER_OS_ERRNOS:
            path = _TS_FAILED_PATH.search(str(exc))
            return int(code.group(1)), path.group(1) if path else None
        exc = exc.__cause__ or exc.__context__
    return None


def _processes_failing(failed: bool) -> list[int]:
    """Indices of the processes that passed ``failed=True``; a collective in multi-process
    runs (every process must call it), trivial in one process."""
    if jax.process_count() == 1:
        return [0] if failed else []
    from jax.experimental import multihost_utils

    flags_P = np.asarray(multihost_utils.process_allgather(np.int32(failed))).reshape(-1)
    return [int(p) for p in np.flatnonzero(flags_P)]


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def abstract_state(state: Any) -> Any:
    """Shape/dtype/sharding skeleton of a state pytree, the target that ``restore`` fills in."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _absolute(directory: str | os.PathLike[str]) -> str:
    """Orbax's tensorstore layer rejects relative paths at write time; URLs (gs://) stay as is."""
    directory = os.fspath(directory)
    return directory if "://" in directory else os.path.abspath(directory)


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of (state, meta) under ``directory``.

    A thin wrapper over ``ocp.CheckpointManager`` so that the train loop has one save rule
    (interval, preemption or force) and restore errors name the directory. Use as a context
    manager, or call ``close()``, so pending async writes finish before the process exits.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ) -> None:
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.directory = _absolute(directory)
        self.save_interval_steps = save_interval_steps
        self._pending: int | None = None  # the step of the save in flight, for errors
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_interval_steps=save_interval_steps,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,  # a killed save's leftovers
            ),
        )

    def _writing(self, call: Callable[[], Any]) -> Any:
        """Runs an orbax call that may surface a failed write; turns a disk-full or permission
        failure into a CheckpointWriteError and removes the partial step directory."""
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - sorted below, others re-raised unchanged
            found = _os_error(exc)
            if found is None:
                raise
            step, self._pending = self._pending, None
            code, path = found
            self._remove_partial_saves()
            kept = self.all_steps()
            resume = (f"it resumes from step {kept[-1]}" if kept else "it starts from step 0")
            raise CheckpointWriteError(
                f"cannot write checkpoint step {step} to {path or self.directory}: "
                f"{os.strerror(code)} (errno {errno.errorcode.get(code, code)}); free space or fix "
                f"permissions, then re-run: {resume}") from exc

    def _remove_partial_saves(self, quiet_s: float = 1.0, limit_s: float = 60.0) -> None:
        """Deletes ``*.orbax-checkpoint-tmp*`` step directories (a failed save's leftovers).

        After the first failed write, orbax reports the error while the other arrays' writes may
        still be in flight and recreate files, so this repeats until nothing reappears for
        `quiet_s` seconds.
        """
        try:
            self._mngr.wait_until_finished()
        except Exception:  # noqa: BLE001 - the failure being handled; leftovers go regardless
            pass
        pattern = os.path.join(glob.escape(self.directory), f"*{_TMP_SUFFIX}*")
        start = quiet = time.monotonic()
        while time.monotonic() - quiet < quiet_s and time.monotonic() - start < limit_s:
            leftovers = glob.glob(pattern)
            for tmp in leftovers:
                shutil.rmtree(tmp, ignore_errors=True)
            if leftovers:
                quiet = time.monotonic()
            time.sleep(0.05)
        self._mngr.reload()

    def should_save(self, step: int) -> bool:
        """On the interval, or at the step all hosts agreed to stop at after a preemption signal.

        ``reached_preemption`` is a cross-host sync point: every process must call it per step.
        """
        preempted = self._mngr.reached_preemption(step)
        return step % self.save_interval_steps == 0 or preempted

    def save(
        self,
        step: int,
        state: Any,
        meta: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Starts an async save of (state, meta) at ``step`` if due; returns whether it saved.

        A step that is already on disk is not written again (so a final forced save on an
        interval step is harmless). Earlier async failures surface here.
        """
        self._writing(self._mngr.check_for_errors)
        if not (self.should_save(step) or force):
            return False
        if step in self._mngr.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta or {}))
        )
        self._writing(self._mngr.wait_until_finished)  # the previous save's errors are its own
        self._pending = step
        # The decision is ours; force=True stops orbax from re-deciding (e.g. skipping a save
        # while the previous one is still in flight, or its "first step always saves" rule).
        return self._writing(lambda: self._mngr.save(step, args=args, force=True))

    def latest_step(self) -> int | None:
        """Newest step on disk (including an in-flight async save), or None if there is none."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON record of ``step``, read without touching its arrays (so a run's identity
        can be checked before restoring anything)."""
        try:
            restored = self._mngr.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = restored.meta
        except Exception as exc:  # noqa: BLE001 - any unreadable record is a corrupt step
            files = [f for f in glob.glob(os.path.join(glob.escape(self._step_dir(step)), "meta",
                                                       "*")) if "commit_success" not in f]
            where = files[0] if len(files) == 1 else os.path.join(self._step_dir(step), "meta")
            raise CheckpointCorruptError(step, where, _first_line(_innermost(exc))) from exc
        if not isinstance(meta, Mapping):
            raise CheckpointCorruptError(step, os.path.join(self._step_dir(step), "meta"),
                                         f"expected a JSON object, got {type(meta).__name__}")
        return dict(meta)

    def _restore_state(self, step: int, abstract_state: Any) -> Any:
        """The step's arrays, read by this process alone.

        The item handler is called directly, without the manager's restore barrier: in a
        multi-process run a process whose read fails would never reach that barrier and leave
        the others waiting in it. ``restore`` and ``restore_latest`` agree on the outcome
        afterwards instead (``_restore_agreed``).
        """
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        where = self._mngr.directory / str(step) / "state"
        _quiet_stranded_reads()  # before the read: its leftovers can print while it fails
        try:
            return ocp.StandardCheckpointHandler().restore(
                where, args=ocp.args.StandardRestore(target))
        except Exception as exc:  # noqa: BLE001 - reported with the step and orbax's cause
            reason = _first_line(_innermost(exc))
        # Outside the except block, so the error does not carry orbax's traceback (and the
        # failed read's coroutines with it) up to the caller.
        raise CheckpointCorruptError(step, str(where), reason)

    def _restore_agreed(self, step: int, abstract_state: Any) -> Any:
        """``_restore_state`` on every process, then an agreement: if any process could not
        read the step, every process raises CheckpointCorruptError for it (naming the first
        process that failed), so all of them fall back to the same step."""
        try:
            state, error = self._restore_state(step, abstract_state), None
        except CheckpointCorruptError as exc:
            state, error = None, exc
        failed = _processes_failing(error is not None)
        if error is not None:
            raise error
        if failed:
            raise CheckpointCorruptError(step, os.path.join(self._step_dir(step), "state"),
                                         f"process {failed[0]} could not read it")
        return state

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Returns (state, meta) of ``step`` (None: the latest), laid out like ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with the target shardings
        (see ``abstract_state()``); a concrete state works too. Restored arrays take those
        shardings, numpy leaves come back as numpy and Python scalars as Python scalars.
        A step that cannot be read raises ``CheckpointCorruptError`` (no fallback here; see
        ``restore_latest``).
        """
        self.wait_until_finished()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise ResumeError(f"no checkpoint to restore in {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise ResumeError(
                f"no checkpoint for step {step} in {self.directory} (available: {steps})"
            )
        meta = self.read_meta(step)
        return self._restore_agreed(step, abstract_state), meta

    def restore_latest(
        self, abstract_state: Any, check: Callable[[dict[str, Any]], None] | None = None
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest step that reads back whole, or None if none exist.

        ``check(meta)`` runs on a step's record *before* its arrays are restored (the run
        identity check: its errors propagate). A newer step that cannot be read is logged as a
        warning naming it, and moved aside to ``corrupt.<step>`` so this run can write that step
        again; if no step can be read, a ``ResumeError`` names every one and why.
        """
        self.wait_until_finished()
        bad: list[CheckpointCorruptError] = []
        for step in reversed(self.all_steps()):
            try:
                meta = self.read_meta(step)
                if check is not None:
                    check(meta)
                state = self._restore_agreed(step, abstract_state)
            except CheckpointCorruptError as exc:
                bad.append(exc)
                continue
            asides = self._move_aside([exc.step for exc in bad]) if bad else {}
            for exc in bad:
                log.warning("%s; resuming from step %d instead (the bad step is kept in %s)",
                            exc, step, asides[exc.step])
            return step, state, meta
        if bad:
            raise ResumeError(f"no intact checkpoint in {self.directory}: "
                              + "; ".join(str(e) for e in bad)
                              + " (move the checkpoints directory away to start over)")
        return None

    def _move_aside(self, steps: list[int]) -> dict[int, str]:
        """Renames bad steps to ``corrupt.<step>[.n]`` so the run can write them again.

        The directory is shared: every process picks the same names before any rename, process
        0 alone renames, and no process lists the steps again before it is done. Returns
        {step: its new path}.
        """
        asides = {}
        for step in steps:
            aside, n = os.path.join(self.directory, f"corrupt.{step}"), 1
            while os.path.exists(aside):
                aside, n = os.path.join(self.directory, f"corrupt.{step}.{n}"), n + 1
            asides[step] = aside
        _sync_processes("checkpoint_names_chosen")
        if jax.process_index() == 0:
            for step, aside in asides.items():
                os.rename(self._step_dir(step), aside)
        _sync_processes("checkpoint_moved_aside")
        self._mngr.reload()
        return asides

    def wait_until_finished(self) -> None:
        """Blocks until in-flight async saves are on disk; raises if one failed."""
        self._writing(self._mngr.wait_until_finished)
        self._pending = None

    def close(self) -> None:
        """Finishes pending saves and releases resources; errors propagate (never swallowed)."""
        self._writing(self._mngr.close)
        self._pending = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
