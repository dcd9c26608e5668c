"""Training checkpoints with orbax-checkpoint: the latest few, and the best by validation.

A checkpoint is the whole training state as a nested dict (parameters, batch-norm statistics,
optimizer state, step, the running epoch's metric sums), saved synchronously: when `save`
returns, the step is on disk. Orbax writes into a temporary directory and renames it when
complete, so a save that dies half-way (kill -9, disk full) leaves the previous checkpoints as
they were. Metrics passed with a save rank it for "best"; checkpoints saved without metrics
(periodic, mid-epoch) are kept only while they are among the latest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

BEST_METRIC = "val_sequence_acc"


class Checkpoints:
    def __init__(self, directory: str | Path, keep_latest: int = 3):
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            best_fn=lambda metrics: metrics[BEST_METRIC],  # makes orbax store the metrics with a save
            best_mode="max",
            preservation_policy=policies.AnyPreservationPolicy(
                [
                    policies.LatestN(keep_latest),
                    policies.BestN(
                        get_metric_fn=lambda metrics: metrics[BEST_METRIC],
                        reverse=False,  # (keeps the n highest)
                        n=1,
                        keep_checkpoints_without_metrics=False,
                    ),
                ]
            ),
        )
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the highest validation sequence accuracy (None if none was validated)."""
        scored = [(metrics[BEST_METRIC], step) for step in self.all_steps() if (metrics := self.metrics(step))]
        return max(scored)[1] if scored else None

    def metrics(self, step: int) -> dict[str, float] | None:
        return self.manager.metrics(step)

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, template: dict[str, Any]) -> dict[str, Any]:
        """The state saved at `step`, shaped and placed (sharded) like `template`."""
        return self.manager.restore(step, args=ocp.args.StandardRestore(template))

    def restore_variables(self, step: int) -> dict[str, Any]:
        """Only the network's variables (params, batch_stats) of the checkpoint at `step`, as saved."""
        state = self.manager.restore(step, args=ocp.args.StandardRestore())
        return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}

    def close(self) -> None:
        self.manager.close()
