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
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "abstract_state"]


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
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_interval_steps=save_interval_steps,
                enable_async_checkpointing=async_save,
            ),
        )

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
        self._mngr.check_for_errors()
        if not (self.should_save(step) or force):
            return False
        if step in self._mngr.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta or {}))
        )
        # The decision is ours; force=True stops orbax from re-deciding (e.g. skipping a save
        # while the previous one is still in flight, or its "first step always saves" rule).
        return self._mngr.save(step, args=args, force=True)

    def latest_step(self) -> int | None:
        """Newest step on disk (including an in-flight async save), or None if there is none."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Returns (state, meta) of ``step`` (None: the latest), laid out like ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with the target shardings
        (see ``abstract_state()``); a concrete state works too. Restored arrays take those
        shardings, numpy leaves come back as numpy and Python scalars as Python scalars.
        """
        self.wait_until_finished()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory} (available: {steps})"
            )
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.meta)

    def wait_until_finished(self) -> None:
        """Blocks until in-flight async saves are on disk; raises if one failed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases resources; errors propagate (never swallowed)."""
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
