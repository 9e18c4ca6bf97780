"""Prediction churn between two retrains (paper, Table 1).

Binary predictions (one probability per example): the mean absolute difference |p_a - p_b|, as the
paper measured on click-through rate. Multiclass (a probability vector per example): the mean total
variation distance, 0.5 * sum_c |p_a,c - p_b,c|, which reduces to the same number for two classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from p2pcod.errors import DataError

PREDICTIONS = "predictions.npy"


def churn(pred_a: np.ndarray, pred_b: np.ndarray) -> float:
    a, b = np.asarray(pred_a, dtype=np.float64), np.asarray(pred_b, dtype=np.float64)
    if a.shape != b.shape:
        raise DataError(f"predictions differ in shape: {a.shape} vs {b.shape} (not the same validation set?)")
    if a.size == 0:
        raise DataError("no predictions to compare")
    if a.ndim == 1:
        return float(np.mean(np.abs(a - b)))
    return float(np.mean(0.5 * np.abs(a - b).sum(axis=-1)))


def save_predictions(run_dir: str | Path, predictions: np.ndarray) -> Path:
    """Write a run's validation predictions atomically (float32), where `churn` looks for them."""
    path = Path(run_dir) / PREDICTIONS
    tmp = path.with_name(PREDICTIONS + ".tmp")
    with tmp.open("wb") as f:
        np.save(f, np.asarray(predictions, dtype=np.float32), allow_pickle=False)
    tmp.replace(path)
    return path


def load_predictions(run_dir: str | Path) -> np.ndarray:
    path = Path(run_dir) / PREDICTIONS
    if not path.exists():
        raise DataError(f"{path} does not exist: is {run_dir} a finished `p2pcod train` run, or a `p2pcod peer` "
                        f"run dir (a simulation's RUN_DIR/peers/<name>)?")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path} is not a predictions file: {err}") from None


def churn_runs(run_a: str | Path, run_b: str | Path) -> float:
    return churn(load_predictions(run_a), load_predictions(run_b))


def mean_and_half_range(values: list[float]) -> tuple[float, float]:
    """How the paper reports churn over retrain pairs: mean ± half the range."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float((arr.max() - arr.min()) / 2)
