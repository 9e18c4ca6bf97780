"""Tasks: a model factory, training shards, held-out validation data and the task loss.

`get_task(cfg)` builds one from a recipe's [task] table (with its "name"). The key `poison` (any task; default
"none") wraps it in a PoisonedTask whose training targets are corrupted: see POISONS and docs/POISONING.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from p2pcod.errors import ConfigError
from p2pcod.tasks.base import POISONS, SPLITS, Batch, PoisonedTask, Task

__all__ = ["POISONS", "SPLITS", "TASKS", "Batch", "PoisonedTask", "Task", "check_config", "get_task", "poison_of",
           "task_class"]

TASKS = ("lm", "ctr")


def task_class(name: str) -> type[Task]:
    # imported lazily: building one task should not pay for the other's imports
    if name == "lm":
        from p2pcod.tasks.lm import LMTask

        return LMTask
    if name == "ctr":
        from p2pcod.tasks.ctr import CTRTask

        return CTRTask
    raise ConfigError(f"unknown task.name {name!r}; known tasks: {', '.join(TASKS)}")


def poison_of(cfg: Mapping[str, Any]) -> str:
    """The [task] table's `poison` ("none" when absent), checked without building the task (cheap)."""
    poison = cfg.get("poison", "none")
    if not isinstance(poison, str) or poison not in POISONS:
        raise ConfigError(f"task.poison must be one of {', '.join(POISONS)}; got {poison!r}")
    return poison


def _name_of(cfg: Mapping[str, Any]) -> str:
    if not isinstance(cfg, Mapping) or "name" not in cfg:
        raise ConfigError(f"task.name is required; known tasks: {', '.join(TASKS)}")
    name = cfg["name"]
    if not isinstance(name, str):
        raise ConfigError(f"task.name must be a string, got {name!r}; known tasks: {', '.join(TASKS)}")
    return name


def check_config(task_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> None:
    """A recipe's [task] and [model] tables checked statically (keys, types, ranges, relations), naming the key
    on error; loads no data and builds no model, so a spec or recipe fails before any process starts."""
    name = _name_of(task_cfg)
    poison_of(task_cfg)
    if not isinstance(model_cfg, Mapping):
        raise ConfigError(f"[model] must be a table, got {type(model_cfg).__name__}")
    task_class(name).check_config({k: v for k, v in task_cfg.items() if k not in ("name", "poison")}, model_cfg)


def get_task(cfg: Mapping[str, Any]) -> Task:
    """The task named by cfg["name"], built from the other keys of the [task] table."""
    name = _name_of(cfg)
    poison = poison_of(cfg)
    task = task_class(name)({k: v for k, v in cfg.items() if k not in ("name", "poison")})
    return task if poison == "none" else PoisonedTask(task, poison)
