"""TeacherPool: the latest checkpoint received from each neighbour, as a frozen model.

A background fetcher thread calls swap() / remove() / retain() while the training thread calls
predict(). Readers take a snapshot of the teacher list under a short lock and run the models outside it;
writers build and load a new module outside the lock and only swap a reference under it, so predict()
always sees a complete, fully loaded set of teachers and never a half-loaded module.

Reuse: when a teacher's model config is unchanged, its previous module is kept as a standby and loaded
with the next checkpoint, instead of building a new one; a standby still in use by a running predict()
is never touched (a fresh module is built instead).

Model configs come from the network: a new module is first built on the meta device (shapes only, no
memory) and must have exactly the state dict's names and shapes before it is built for real, so a config
announcing an enormous model with a small checkpoint allocates nothing (`meta_model`, which the fetcher
also uses to vet a record's config before fetching its checkpoint).

Precision (`distill.teacher_precision`): teachers may run cheaper than the student. bf16 holds the module in
bfloat16; int8 runs a dynamically quantised copy of it (int8 Linear weights, torch.ao's quantize_dynamic,
CPU only); "auto" is bf16 where the device computes it natively (CUDA with bf16, a CPU with AVX512-BF16 or
AMX) and fp32 elsewhere. Targets are float32 whatever the teachers ran in.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from p2pcod import distill
from p2pcod.distill import DistillConfig
from p2pcod.errors import P2pcodError

log = logging.getLogger(__name__)


class TeacherError(P2pcodError):
    """A teacher could not be loaded or run: config that builds no model, state dict that does not fit."""


@dataclass(frozen=True)
class TeacherInfo:
    name: str
    step: int
    model_cfg: dict
    received_at: float  # time.time() when swapped in
    meta: dict


@dataclass(frozen=True)
class TeacherCopy:
    """A teacher as snapshot() returns it: its info and a CPU copy of its weights, owned by the caller."""

    info: TeacherInfo
    state: dict[str, torch.Tensor]


@dataclass(eq=False)
class _Slot:
    """One loaded module; `busy` counts predict() calls running it (guarded by the pool lock). `runner` is what
    predict() runs: the module itself, or its int8 copy."""

    module: torch.nn.Module
    cfg_key: str
    info: TeacherInfo
    busy: int = field(default=0)
    runner: torch.nn.Module | None = None


@functools.lru_cache(maxsize=1)
def _cpu_bf16_native() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def teacher_precision(precision: str, device: str | torch.device) -> tuple[torch.dtype | None, bool]:
    """(dtype teacher modules are held in, or None for fp32; whether their Linear layers run int8)."""
    device = torch.device(device)
    if precision == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_bf16_native()
        precision = "bf16" if native else "fp32"
    if precision == "int8" and device.type != "cpu":
        log.warning("distill.teacher_precision = 'int8' runs on the CPU only; teachers on %s run in bf16", device)
        precision = "bf16"
    return (torch.bfloat16 if precision == "bf16" else None), precision == "int8"


def _quantize_dynamic() -> Callable[..., torch.nn.Module]:
    """torch.ao's quantize_dynamic (fbgemm / x86 kernels), looked up when a pool is made, so that a torch without it
    is an error at start, never a failed swap counted against an honest neighbour.

    It is deprecated in favour of torchao, but torchao's int8 paths need torch.compile to be fast on CPU, and the
    aten kernel they fall back to (_weight_int8pack_mm) was far slower than an fp32 matmul on this project's CPU;
    this is the fast int8 path the pinned torch has.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from torch.ao.quantization import quantize_dynamic
        except ImportError as e:  # a future torch without it
            raise TeacherError("distill.teacher_precision = 'int8' needs torch.ao.quantization.quantize_dynamic, "
                               "which this torch does not have: use 'bf16' or 'fp32'") from e
    return quantize_dynamic


def _int8_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose Linear layers hold int8 weights (per output channel) and quantise activations."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _quantize_dynamic()(module, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=False)


def _cfg_key(model_cfg: Mapping) -> str:
    """A canonical text of a model config, to tell whether two configs build the same module."""
    try:
        return json.dumps(model_cfg, sort_keys=True, default=repr)
    except (TypeError, ValueError) as e:
        raise TeacherError(f"model config is not serialisable: {e}") from e


def _check_state_dict(name: str, state_dict: Mapping) -> None:
    if not isinstance(state_dict, Mapping):
        raise TeacherError(f"teacher {name!r}: state dict must be a mapping, got {type(state_dict).__name__}")
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TeacherError(
                f"teacher {name!r}: state dict entry {key!r} is {type(t).__name__}, not a tensor"
            )
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise TeacherError(f"teacher {name!r}: tensor {key!r} has non-finite values (NaN or inf)")


def _check_fits(name: str, expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> None:
    """The state dict has exactly the names and shapes of the model its config builds."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise TeacherError(f"teacher {name!r}: state dict does not fit the model of its config: missing keys "
                           f"{missing[:8]}, unexpected keys {unexpected[:8]}")
    for k, t in expected.items():
        got, want = tuple(state_dict[k].shape), tuple(t.shape)
        if got != want:
            raise TeacherError(f"teacher {name!r}: state dict does not fit the model of its config: size mismatch "
                               f"for {k}: {got} in the checkpoint, {want} in the model")


class TeacherPool:
    """Frozen teacher models by neighbour name; thread-safe; aggregates their predictions."""

    def __init__(
        self,
        build_model: Callable[[Mapping], torch.nn.Module],
        cfg: DistillConfig,
        kind: str,
        device: str | torch.device = "cpu",
        max_teachers: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if kind not in distill.KINDS:
            raise TeacherError(f"output kind must be one of {', '.join(distill.KINDS)}; got {kind!r}")
        if max_teachers is not None and (isinstance(max_teachers, bool) or max_teachers < 1):
            raise TeacherError(f"max_teachers must be >= 1 or None, got {max_teachers!r}")
        self._build_model = build_model
        self.cfg = cfg
        self.kind = kind
        self.device = torch.device(device)
        resolved, self.int8 = teacher_precision(cfg.teacher_precision, self.device)
        if self.int8:
            _quantize_dynamic()  # a torch without int8 kernels stops here, not at every teacher swap
        self.dtype = dtype if dtype is not None else resolved
        self.max_teachers = max_teachers
        self._lock = threading.Lock()
        self._active: dict[str, _Slot] = {}
        self._standby: dict[str, _Slot] = {}
        self._skipped: dict[str, int] = {}
        self._warned: dict[str, float] = {}  # per teacher: received_at of the checkpoint last warned about

    # ----------------------------------------------------------------------------------------- writers

    def swap(
        self,
        name: str,
        state_dict: Mapping[str, torch.Tensor],
        model_cfg: Mapping,
        step: int,
        meta: Mapping | None = None,
    ) -> None:
        """Load `state_dict` as the teacher `name`; on any failure the old teacher (if any) stays."""
        if not isinstance(name, str) or not name:
            raise TeacherError(f"teacher name must be a non-empty string, got {name!r}")
        if not isinstance(model_cfg, Mapping):
            raise TeacherError(
                f"teacher {name!r}: model config must be a mapping, got {type(model_cfg).__name__}"
            )
        if isinstance(step, bool) or not isinstance(step, int):
            raise TeacherError(f"teacher {name!r}: step must be an integer, got {step!r}")
        _check_state_dict(name, state_dict)
        key = _cfg_key(model_cfg)
        with self._lock:
            spare = self._standby.get(name)
            module = None
            if spare is not None and spare.cfg_key == key and spare.busy == 0:
                module = self._standby.pop(name).module  # ours alone now: no reader holds it
        if module is None:
            module = self._new_module(name, model_cfg, state_dict)
        self._load(name, module, state_dict)
        runner = self._runner(name, module)
        info = TeacherInfo(name, step, copy.deepcopy(dict(model_cfg)), time.time(), dict(meta or {}))
        with self._lock:
            old = self._active.get(name)
            self._active = {**self._active, name: _Slot(module, key, info, runner=runner)}
            if old is not None and old.cfg_key == key:
                self._standby[name] = old
            else:
                self._standby.pop(name, None)
            self._evict_locked(keep=name)

    def _runner(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        """What predict() runs for this teacher: the module, or its int8 copy (teacher_precision = "int8")."""
        if not self.int8:
            return module
        try:
            return _int8_copy(module)
        except Exception as e:  # noqa: BLE001 - our own conversion failing is no fault of the peer: run it as it is
            log.warning("teacher %r: int8 conversion failed (%r); it runs unquantised", name, e)
            return module

    def meta_model(self, model_cfg: Mapping, name: str = "") -> torch.nn.Module:
        """The module `model_cfg` builds, on the meta device: its parameters have shapes and dtypes but no
        storage, so even an absurd config costs no memory (the task's build_model bounds its keys first).
        TeacherError when the config builds no model."""
        return self._build(model_cfg, name, meta=True)

    def _build(self, model_cfg: Mapping, name: str, meta: bool) -> torch.nn.Module:
        who = f"teacher {name!r}" if name else "announced model config"
        if not isinstance(model_cfg, Mapping):
            raise TeacherError(f"{who}: model config must be a mapping, got {type(model_cfg).__name__}")
        try:
            if meta:
                with torch.device("meta"):  # thread-local: the training thread keeps its own default device
                    module = self._build_model(dict(model_cfg))
            else:
                module = self._build_model(dict(model_cfg))
        except P2pcodError as e:
            raise TeacherError(f"{who}: cannot build a model from its config: {e}") from e
        except Exception as e:  # a malformed config from a peer must not kill the fetcher
            raise TeacherError(f"{who}: building the model from its config failed: {e!r}") from e
        if not isinstance(module, torch.nn.Module):
            raise TeacherError(f"{who}: build_model returned {type(module).__name__}, not a Module")
        return module

    def _new_module(self, name: str, model_cfg: Mapping, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        # vetted on meta first: a real module is only built when it is exactly as big as the state dict we hold
        _check_fits(name, self.meta_model(model_cfg, name).state_dict(), state_dict)
        module = self._build(model_cfg, name, meta=False)
        return module.to(device=self.device, dtype=self.dtype) if self.dtype else module.to(self.device)

    def _load(self, name: str, module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
        try:
            with torch.no_grad():
                module.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:  # missing / unexpected keys, shape mismatch
            raise TeacherError(f"teacher {name!r}: state dict does not fit its model: {e}") from e
        module.eval()
        module.requires_grad_(False)

    def _evict_locked(self, keep: str) -> None:
        """Drop the stalest other teachers (lowest step, then oldest) while over max_teachers."""
        if self.max_teachers is None:
            return
        while len(self._active) > self.max_teachers:
            others = [s.info for n, s in self._active.items() if n != keep]
            victim = min(others, key=lambda i: (i.step, i.received_at, i.name)).name
            self._drop_locked(victim)

    def _drop_locked(self, name: str) -> bool:
        self._standby.pop(name, None)
        self._warned.pop(name, None)
        if name not in self._active:
            return False
        self._active = {n: s for n, s in self._active.items() if n != name}
        return True

    def remove(self, name: str) -> bool:
        """Drop teacher `name`; True if it was there."""
        with self._lock:
            return self._drop_locked(name)

    def retain(self, names: Iterable[str]) -> list[str]:
        """Drop every teacher not in `names` (peers that left the neighbourhood); returns the dropped."""
        keep = set(names)
        with self._lock:
            dropped = sorted(n for n in self._active if n not in keep)
            for n in dropped:
                self._drop_locked(n)
            for n in [n for n in self._standby if n not in keep]:
                del self._standby[n]
        return dropped

    # ----------------------------------------------------------------------------------------- readers

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._active)

    def info(self) -> list[TeacherInfo]:
        with self._lock:
            return [self._active[n].info for n in sorted(self._active)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._active)

    def snapshot(self) -> list[TeacherCopy]:
        """Every teacher held now, in names() order: its info and a CPU copy of its weights.

        The set of teachers is taken under the lock, and each module is marked busy while it is copied, so
        a concurrent swap() never reloads it: every copy's weights are exactly those of its info's step.
        """
        with self._lock:
            slots = [self._active[n] for n in sorted(self._active)]
            for s in slots:
                s.busy += 1
        try:
            return [TeacherCopy(s.info, {k: v.detach().to("cpu", copy=True) for k, v in s.module.state_dict().items()})
                    for s in slots]
        finally:
            with self._lock:
                for s in slots:
                    s.busy -= 1

    def staleness(self, my_step: int) -> dict[str, int]:
        """my_step - the step of each teacher's checkpoint."""
        return {i.name: my_step - i.step for i in self.info()}

    def logits(self, x) -> list[torch.Tensor]:
        """Each teacher's float32 logits on x, in names() order (empty when there are none).

        Raw outputs for diagnostics: a teacher that fails raises TeacherError naming it.
        """
        return [out for _, out in self._outputs(x, skip_bad=False, expect_shape=None)]

    def predict(self, x, expect_shape: Sequence[int] | None = None,
                only: Iterable[str] | None = None) -> torch.Tensor | None:
        """The aggregated distillation target of the teachers on x (see distill.aggregate), or None.

        `only`: run just these teachers (a per-step draw, distill.draw_teachers); names no longer held are
        ignored. A teacher that raises, returns non-finite logits or (when expect_shape is given, e.g. the
        student's logits shape) logits of another shape is left out of this call and counted in
        skipped(): one bad checkpoint from the network must not stop or poison training. None when
        the pool is empty or every teacher was left out.
        """
        outs = [out for _, out in self._outputs(x, skip_bad=True, expect_shape=expect_shape, only=only)]
        if not outs:
            return None
        return distill.aggregate(outs, self.cfg, self.kind)

    def skipped(self) -> dict[str, int]:
        """How many predict() calls left each teacher out (failed, non-finite or wrong shape)."""
        with self._lock:
            return dict(self._skipped)

    def _outputs(
        self, x, skip_bad: bool, expect_shape: Sequence[int] | None, only: Iterable[str] | None = None
    ) -> list[tuple[str, torch.Tensor]]:
        wanted = None if only is None else set(only)
        with self._lock:
            slots = [self._active[n] for n in sorted(self._active) if wanted is None or n in wanted]
            for s in slots:
                s.busy += 1
        try:
            if not slots:
                return []
            x = self._to_device(x)
            out = []
            # no_grad, not inference_mode: inference tensors cannot be saved for the student's backward
            with torch.no_grad():
                for s in slots:
                    try:
                        out.append((s.info.name, self._run(s, x, skip_bad, expect_shape)))
                    except TeacherError as e:
                        if not skip_bad:
                            raise
                        self._note_skip(s, e)
            return out
        finally:
            with self._lock:
                for s in slots:
                    s.busy -= 1

    def _run(self, slot: _Slot, x, check: bool, expect_shape: Sequence[int] | None) -> torch.Tensor:
        name = slot.info.name
        try:
            out = (slot.runner or slot.module)(x)
        except Exception as e:  # a foreign model that does not run on our inputs
            raise TeacherError(f"teacher {name!r} (step {slot.info.step}) failed on this batch: {e!r}") from e
        if not isinstance(out, torch.Tensor):
            raise TeacherError(f"teacher {name!r}: model returned {type(out).__name__}, not a logits tensor")
        if expect_shape is not None and tuple(out.shape) != tuple(expect_shape):
            raise TeacherError(
                f"teacher {name!r}: logits shape {tuple(out.shape)}, expected {tuple(expect_shape)}"
            )
        out = out.float()
        if check and not bool(torch.isfinite(out).all()):
            raise TeacherError(f"teacher {name!r} (step {slot.info.step}) produced non-finite logits")
        return out

    def _note_skip(self, slot: _Slot, err: TeacherError) -> None:
        with self._lock:
            self._skipped[slot.info.name] = self._skipped.get(slot.info.name, 0) + 1
            first = self._warned.get(slot.info.name) != slot.info.received_at
            self._warned[slot.info.name] = slot.info.received_at
        if first:  # once per checkpoint, not once per step
            log.warning("%s; leaving it out of the distillation target", err)

    def _to_device(self, x):
        """Move x (a tensor or a tuple/list of tensors) to the pool's device; floats to its dtype."""
        if isinstance(x, torch.Tensor):
            dtype = self.dtype if (self.dtype is not None and x.is_floating_point()) else x.dtype
            return x.to(device=self.device, dtype=dtype)
        if isinstance(x, (tuple, list)):
            return type(x)(self._to_device(v) for v in x)
        return x
