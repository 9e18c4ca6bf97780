"""M models codistilling in one process (the paper's footnote variant), and its baselines.

Every `reload_every` steps each model is encoded with the codec and decoded again before it is swapped
into the other models' TeacherPools, so the teachers go through exactly the int8 path a checkpoint takes
over the network. Who learns from whom is `exchange.topology` over the models m0..m<M-1>, as it is over
peers (two models: each from the other; "none": M independent models; "edges": pairs of those names).
`mode="ensemble"` trains M independent copies and evaluates their averaged prediction; M = 1 is the plain
baseline. Run layout: RUN_DIR/m<i>/metrics.jsonl per model, RUN_DIR/metrics.jsonl
for the group (the deployed prediction: model 0, or the ensemble), RUN_DIR/checkpoint.ckpt,
RUN_DIR/predictions.npy, RUN_DIR/recipe.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pcod import checkpoint, codec
from p2pcod.churn import save_predictions
from p2pcod.config import Recipe
from p2pcod.errors import CheckpointError, ConfigError
from p2pcod.tasks import get_task
from p2pcod.teachers import TeacherPool
from p2pcod.topology import neighbours
from p2pcod.trainer import MetricsLog, Trainer, ensemble_loss, predictions_of

MODES = ("codistill", "ensemble")


class LocalGroup:
    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | Path,
        *,
        models: int = 2,
        mode: str = "codistill",
        fp32_teachers: bool = False,
    ) -> None:
        if models < 1:
            raise ConfigError(f"--models must be >= 1, got {models}")
        if mode not in MODES:
            raise ConfigError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.mode = mode
        self.fp32_teachers = fp32_teachers
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        self.task = get_task(recipe.task)
        self.names = [f"m{i}" for i in range(models)]
        self.topology = recipe.exchange.topology_config()
        distilling = mode == "codistill" and models > 1 and self.topology.name != "none"
        if distilling and self.topology.name == "edges":
            strangers = sorted({n for e in self.topology.edges for n in e} - set(self.names))
            if strangers:
                raise ConfigError(f"exchange.edges names {', '.join(map(repr, strangers))}, but the models of "
                                  f"`p2pcod train --models {models}` are {', '.join(self.names)}")
        t = recipe.train
        val = self.task.val_batches(t.eval_batch_size, t.eval_batches)
        self.trainers = [
            Trainer(
                recipe, self.task, shard=i, num_shards=models, run_dir=self.run_dir / name,
                teachers=self._pool() if distilling else None, val_batches=val,
            )
            for i, name in enumerate(self.names)
        ]
        self.val = val
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.blobs: dict[str, tuple[int, bytes]] = {}  # last published checkpoint per model
        self.bytes_exchanged = 0
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _pool(self) -> TeacherPool:
        return TeacherPool(self.task.build_model, self.recipe.distill, self.task.kind)

    @property
    def step(self) -> int:
        return self.trainers[0].step

    # ---- teacher exchange through the codec -----------------------------------------------------
    def publish(self) -> None:
        """Encode every model (as a peer would before serving it)."""
        opts = self.recipe.exchange.codec_options()
        for name, tr in zip(self.names, self.trainers, strict=True):
            meta = {"peer": name, "step": tr.step, "task": self.task.name, "model": self.recipe.model}
            self.blobs[name] = (tr.step, codec.encode(tr.model.state_dict(), meta, opts))

    def refresh_teachers(self) -> None:
        """Each model takes its neighbours' last published checkpoints as teachers (decoded from bytes)."""
        topo = self.topology
        round_ = self.step // self.recipe.exchange.reload_every
        for name, tr in zip(self.names, self.trainers, strict=True):
            if tr.teachers is None:
                continue
            wanted = neighbours(name, self.names, round_, topo)
            for other in wanted:
                step, blob = self.blobs[other]
                if self.fp32_teachers:
                    state = {k: v.clone() for k, v in self.trainers[self.names.index(other)].model.state_dict().items()}
                else:
                    state, _ = codec.decode(blob, expect_fingerprint=codec.fingerprint(tr.model))
                tr.teachers.swap(other, state, self.recipe.model, step)
                self.bytes_exchanged += len(blob)
            tr.teachers.retain(wanted)

    # ---- the loop -------------------------------------------------------------------------------
    def run(self, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        t, ex = self.recipe.train, self.recipe.exchange
        # written here, not in __init__, so that a --resume refused by resume() leaves the run's record alone
        (self.run_dir / "recipe.json").write_text(json.dumps(
            {"recipe": self.recipe.to_dict(), "models": len(self.names), "mode": self.mode,
             "fp32_teachers": self.fp32_teachers},
            indent=1,
        ))
        if self.step == 0:
            self._log(evaluate=True, progress=progress)
        while self.step < t.steps:
            for tr in self.trainers:
                tr.train_step()
            if self.trainers[0].teachers is not None and self.step % ex.reload_every == 0:
                self.publish()
                self.refresh_teachers()
            evaluate = self.trainers[0].due(t.eval_every)
            if evaluate or self.trainers[0].due(t.log_every):
                self._log(evaluate=evaluate, progress=progress)
            if self.step % t.checkpoint_every == 0:
                self.save()
        self.save()
        save_predictions(self.run_dir, self.deployed_predictions())
        return self.summary()

    def _log(self, evaluate: bool, progress) -> None:
        lines = [tr.log(evaluate=evaluate) for tr in self.trainers]
        record: dict[str, Any] = {"step": self.step, "time": lines[0]["time"], "models": len(lines)}
        for key in ("train_loss", "distill_loss", "val_loss"):
            vals = [line[key] for line in lines if key in line]
            if vals:
                record[key] = round(float(np.mean(vals)), 6)
        if evaluate and self.mode == "ensemble" and len(self.trainers) > 1:
            models = [tr.model for tr in self.trainers]
            record["ensemble_val_loss"] = round(ensemble_loss(models, self.task, self.val), 6)
        record["teachers"] = lines[0].get("teachers", 0)
        record["bytes_exchanged"] = self.bytes_exchanged
        self.metrics.write(record)
        if progress:
            progress(record)

    def deployed_predictions(self) -> np.ndarray:
        """What would be served: the ensemble's averaged prediction, or model 0's."""
        models = [tr.model for tr in self.trainers] if self.mode == "ensemble" else [self.trainers[0].model]
        return predictions_of(models, self.task, self.val)

    def summary(self) -> dict[str, Any]:
        vals = [tr.evaluate() for tr in self.trainers]
        out: dict[str, Any] = {"step": self.step, "val_loss": vals, "bytes_exchanged": self.bytes_exchanged}
        if self.mode == "ensemble" and len(self.trainers) > 1:
            out["ensemble_val_loss"] = ensemble_loss([tr.model for tr in self.trainers], self.task, self.val)
        return out

    # ---- checkpoint / resume --------------------------------------------------------------------
    def save(self) -> None:
        state = {
            "mode": self.mode,
            "models": [tr.state() for tr in self.trainers],
            "blobs": {name: [step, blob] for name, (step, blob) in self.blobs.items()},
            "bytes_exchanged": self.bytes_exchanged,
        }
        checkpoint.save(self.run_dir / "checkpoint.ckpt", state)

    def resume(self) -> bool:
        path = self.run_dir / "checkpoint.ckpt"
        if not path.exists():
            return False
        state = checkpoint.load(path)
        held = state.get("models")
        if not isinstance(held, list) or "blobs" not in state:
            raise CheckpointError(f"{path} is not a `p2pcod train` checkpoint (a peer's? `p2pcod inspect` it)")
        if len(held) != len(self.trainers):
            raise CheckpointError(f"{path} holds {len(held)} model(s), but --models {len(self.trainers)} was asked: "
                                  f"resume with --models {len(held)}, or start a new --run-dir")
        mode = state.get("mode", self.mode)  # checkpoints from before the mode was stored: trust the flag
        if mode != self.mode:
            flag = "with --ensemble" if mode == "ensemble" else "without --ensemble"
            raise CheckpointError(f"{path} is a {mode} run: resume it {flag}, or start a new --run-dir")
        for name, tr, s in zip(self.names, self.trainers, held, strict=True):
            try:
                tr.load_state(s)
            except CheckpointError as err:
                raise CheckpointError(f"{path}, model {name}: {err}") from None
        self.blobs = {name: (int(step), bytes(blob)) for name, (step, blob) in state["blobs"].items()}
        self.bytes_exchanged = int(state["bytes_exchanged"])
        if self.blobs and self.trainers[0].teachers is not None:
            counted = self.bytes_exchanged
            self.refresh_teachers()  # the teachers the interrupted run held at this step
            self.bytes_exchanged = counted
        return True

    def close(self) -> None:
        self.metrics.close()
        for tr in self.trainers:
            tr.close()
