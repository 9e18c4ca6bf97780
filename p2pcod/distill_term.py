"""The distillation term of one training step: which teachers run, on which examples, and when.

    loss = φ(y, F(θ, x)) + α · ψ( mean over a draw of k teachers of F(θ_j, x[:n]), F(θ, x)[:n] )

A step's teacher cost is bounded whatever the number of neighbours held: `distill.teachers_per_step` (k)
teachers drawn per step (distill.draw_teachers), on the first n = ceil(`distill.batch_fraction` · B) examples
(distill.rows), in `distill.teacher_precision` (TeacherPool). With `distill.prefetch` the target of the next
batch is computed in a worker thread (on a side CUDA stream on a GPU) while the student runs its backward pass.
The Trainer (`p2pcod train`, `p2pcod peer`) and Session.distill_loss (your own loop) both go through this.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from p2pcod import distill
from p2pcod.distill import DistillConfig
from p2pcod.teachers import TeacherPool


@dataclass
class Term:
    """A step's distillation loss and what it cost: how many teacher forward passes it ran."""

    loss: torch.Tensor
    teacher_passes: int = 0


class DistillTerm:
    def __init__(self, cfg: DistillConfig, kind: str, teachers: TeacherPool | None,
                 unigram: torch.Tensor | None = None) -> None:
        self.cfg = cfg
        self.kind = kind
        self.teachers = teachers
        self._unigram = unigram
        self._pool: ThreadPoolExecutor | None = None
        # ((step, seed), input, future target) computed in advance
        self._ahead: tuple[tuple[int, int], Any, Future] | None = None
        self._stream = None

    def active(self, step: int) -> bool:
        """Whether `step` has a distillation term at all (past burn-in, with teachers or a smoothing target)."""
        if distill.weight(step, self.cfg) == 0.0:
            return False
        return self.cfg.target != "teachers" or (self.teachers is not None and len(self.teachers) > 0)

    def loss(self, logits: torch.Tensor, x: Any, step: int, seed: int) -> Term:
        """weight(step) · ψ(target, student) on the step's first rows; zero (no grad) without a target.
        The teachers run are drawn from (seed, step): a resumed run continues the same draws."""
        zero = Term(torch.zeros((), dtype=torch.float32, device=logits.device))
        if not self.active(step):
            self.discard()
            return zero
        n = distill.rows(int(logits.shape[0]), self.cfg)
        student = logits[:n]
        if self.cfg.target != "teachers":
            target = distill.smoothing_target(student, self.cfg, self.kind, self._unigram)
            return Term(distill.loss(student, target, self.cfg, self.kind, step))
        target, passes = self._target(x, n, tuple(student.shape), step, seed)
        if target is None:
            return zero
        return Term(distill.loss(student, target, self.cfg, self.kind, step), passes)

    def _target(self, x: Any, n: int, shape: tuple[int, ...], step: int, seed: int
                ) -> tuple[torch.Tensor | None, int]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == (step, seed) and ahead[1] is x and ahead[2].exception() is None:
            target, passes = ahead[2].result()
            if self._stream is not None and target is not None:
                # the side stream's work must be done before the student reads it, and its memory not reused
                # by the side stream while this stream still reads it
                torch.cuda.current_stream().wait_stream(self._stream)
                target.record_stream(torch.cuda.current_stream())
            if target is None or tuple(target.shape) == shape:
                return target, passes
        return self._compute(x, n, shape, step, seed)

    def _compute(self, x: Any, n: int, shape: tuple[int, ...], step: int, seed: int
                 ) -> tuple[torch.Tensor | None, int]:
        assert self.teachers is not None
        chosen = distill.draw_teachers(self.teachers.names(), self.cfg, seed, step)
        target = self.teachers.predict(distill.take_rows(x, n), expect_shape=shape, only=chosen)
        return target, (len(chosen) if target is not None else 0)

    # ---- prefetch -------------------------------------------------------------------------------
    def prefetch(self, x: Any, shape: tuple[int, ...], step: int, seed: int) -> None:
        """Start computing the target of `step` (input `x`, student logits of `shape`) in the background, so that
        it overlaps the current step's backward pass. No-op unless distill.prefetch is on and `step` distils."""
        if not self.cfg.prefetch or self.cfg.target != "teachers" or not self.active(step):
            return
        n = distill.rows(int(shape[0]), self.cfg)
        rows_shape = (n, *shape[1:])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="p2pcod-teacher-prefetch")
            if _device_of(x).type == "cuda":
                self._stream = torch.cuda.Stream(device=_device_of(x))
        self.discard()
        if self._stream is not None:  # x was made on this stream: the side stream must not read it before
            self._stream.wait_stream(torch.cuda.current_stream())
        self._ahead = ((step, seed), x, self._pool.submit(self._in_background, x, n, rows_shape, step, seed))

    def _in_background(self, x: Any, n: int, shape: tuple[int, ...], step: int, seed: int):
        if self._stream is None:
            return self._compute(x, n, shape, step, seed)
        with torch.cuda.stream(self._stream):
            return self._compute(x, n, shape, step, seed)

    def discard(self) -> None:
        """Forget a target computed in advance (waiting for it, so no teacher pass outlives the step)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[2].exception()  # waits; an error in the background is recomputed in the foreground, not raised

    def close(self) -> None:
        self.discard()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _device_of(x: Any) -> torch.device:
    if isinstance(x, torch.Tensor):
        return x.device
    return _device_of(x[0])
