# GENERATED from ctfm_common/checkpoint.py by ctfm-sync-bundles: edit the source, not this copy.
# Copyright (c) CT-FM bundles contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Checkpoints that survive a kill: atomic writes, a fixed-name "last" file, resume lookup, and the
settings a checkpoint was trained with.

Training settings (spacing, patch size, intensity window, classes, width) go to a JSON file beside
each checkpoint, ``<checkpoint>.settings.json`` (:func:`write_training_settings`), bound to the
checkpoint by its SHA-256. A sidecar, not an entry inside the checkpoint: ``model.pt`` stays a plain
state dict that MONAI's ``CheckpointLoader``, ``ckpt_export`` and MONAI Label load strictly, and weights
from elsewhere (the public release) simply have none. Evaluation and inference compare their own
settings with it (:func:`check_training_settings`) and warn in one line when they differ.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.handlers import CheckpointSaver

from .download import sha256_of

logger = logging.getLogger(__name__)

_ITERATION_OR_EPOCH = re.compile(r"(?:iteration|epoch)=(\d+)\.pt$")
#: Ignite's atomic save writes ``tempfile.NamedTemporaryFile(dir=save_dir)`` (``tmp`` + 8
#: characters) before renaming it; a run killed mid-save leaves that file behind.
_IGNITE_TEMPORARY = re.compile(r"^tmp[a-z0-9_]{8}$")


#: What torch's zip writer says when a write fails midway (it drops the OS error, e.g. a full disk).
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
#: Below this much free space a failed checkpoint write is reported as a full disk.
LOW_DISK_BYTES = 512 * 2**20


def _explain_write_failures(save_func):
    """Wrap a ``DiskSaver._save_func`` so that torch's "unexpected pos 16008960" becomes an ``OSError`` naming
    the checkpoint and, when the disk is (nearly) full, saying so ("No space left on device")."""

    def save(checkpoint, path, func):
        try:
            return save_func(checkpoint, path, func)
        except RuntimeError as e:
            text = str(e)
            if not any(marker in text for marker in _TORCH_WRITE_FAILURES):
                raise
            import errno
            import shutil

            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            first = text.strip().splitlines()[0][:200]
            if free < LOW_DISK_BYTES:
                raise OSError(
                    errno.ENOSPC, f"No space left on device while writing this checkpoint ({free / 2**20:.0f} MiB "
                    "free); the previous checkpoint is kept", str(path)
                ) from e
            raise OSError(errno.EIO, f"writing this checkpoint failed ({first}); the previous one is kept",
                          str(path)) from e

    return save


def _keep_file(filename: str) -> None:
    """A save handler's ``remove`` that keeps the file (it is overwritten atomically instead)."""


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` writing every file atomically, with an optional fixed-name "last" file.

    MONAI 1.6.1 turns Ignite's atomic writes off, so a save cut short by a kill leaves a
    truncated checkpoint. Here each file goes to a temporary file and replaces the old one in
    one step (Ignite's atomic mode, which also makes the file readable by group and others).
    With ``last_filename`` the interval checkpoint always has the same name (e.g. ``last.pt``)
    and is replaced, never deleted first, so a run can always resume from it.

    Args:
        last_filename: fixed name of the interval checkpoint (``save_interval > 0``).
        settings: the training settings written beside every checkpoint saved
            (:func:`write_training_settings`); ``None``: none.
        kwargs: ``CheckpointSaver`` arguments (``save_dir``, ``save_dict``, ``save_key_metric``,
            ``key_metric_filename``, ``save_final``, ``save_interval``, ``n_saved``, ...).
    """

    def __init__(self, last_filename: str | None = None, settings: Mapping[str, Any] | None = None, **kwargs) -> None:
        Path(kwargs["save_dir"]).mkdir(parents=True, exist_ok=True)
        super().__init__(**kwargs)
        self.settings = dict(settings) if settings else None
        if last_filename and self._interval_checkpoint is not None:
            self._interval_checkpoint.save_handler.filename = last_filename
            self._interval_checkpoint.n_saved = None
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is None:
                continue
            checkpoint.save_handler._atomic = True
            checkpoint.save_handler._save_func = _explain_write_failures(checkpoint.save_handler._save_func)
            if checkpoint.save_handler.filename is not None:
                # Ignite deletes the file it replaces before writing the new one; a fixed name is
                # replaced in place by the atomic write instead, so there is always a checkpoint.
                checkpoint.save_handler.remove = _keep_file

    def _latest_file(self, checkpoint) -> tuple | None:
        """The file ``checkpoint`` wrote last, as (path, inode, mtime, size): an atomic save makes a new inode."""
        name = getattr(checkpoint.save_handler, "filename", None) or (
            checkpoint._saved[-1].filename if checkpoint._saved else None)
        path = Path(self.save_dir) / name if name else None
        if path is None or not path.is_file():
            return None
        stat = path.stat()
        return path, stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _saving(self, checkpoint, save, engine) -> None:
        """``save(engine)``, then the settings beside the file it wrote (if it wrote one)."""
        if self.settings is None or checkpoint is None:
            save(engine)
            return
        before = self._latest_file(checkpoint)
        save(engine)
        after = self._latest_file(checkpoint)
        if after is not None and after != before:
            write_training_settings(after[0], self.settings)

    def metrics_completed(self, engine) -> None:
        self._saving(self._key_metric_checkpoint, super().metrics_completed, engine)

    def interval_completed(self, engine) -> None:
        self._saving(self._interval_checkpoint, super().interval_completed, engine)

    def completed(self, engine) -> None:
        self._saving(self._final_checkpoint, super().completed, engine)

    def state_dict(self) -> dict:
        """The best-metric tracking state, so a resumed run keeps the best score to beat."""
        if self._key_metric_checkpoint is None:
            return {"_saved": []}
        state = self._key_metric_checkpoint.state_dict()
        # plain floats: a metric may be a NumPy scalar, which a weights_only load refuses
        state["_saved"] = [(float(priority), str(name)) for priority, name in state["_saved"]]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` (nothing to restore without key-metric saving)."""
        if self._key_metric_checkpoint is not None:
            super().load_state_dict(state_dict)


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> str:
    """The checkpoint with the highest ``iteration=N`` / ``epoch=N`` in ``ckpt_dir``, or ``""``.

    Rerunning the same command resumes from it.
    """
    best, best_count = "", -1
    for path in Path(ckpt_dir).glob(f"{prefix}_*.pt"):
        match = _ITERATION_OR_EPOCH.search(path.name)
        if match and int(match.group(1)) > best_count:
            best, best_count = str(path), int(match.group(1))
    if best:
        logger.info(f"resuming from {best}")
    return best


#: The fixed name of every train config's resumable checkpoint (``last_ckpt``).
LAST_CHECKPOINT = "last.pt"
#: Names that checkpoint had in earlier releases (the triage bundle wrote ``model_last.pt``).
EARLIER_LAST_CHECKPOINTS = ("model_last.pt",)


def resume_checkpoint(last_ckpt: str | os.PathLike) -> str:
    """The checkpoint a rerun continues from: ``last_ckpt``, or, when only a run of an earlier release
    is there, its file under an earlier name (:data:`EARLIER_LAST_CHECKPOINTS`) in the same folder.

    Runs always write ``last_ckpt``; reading the earlier name keeps an existing run resumable.
    """
    path = Path(last_ckpt)
    if path.is_file():
        return os.fspath(last_ckpt)
    for name in EARLIER_LAST_CHECKPOINTS:
        earlier = path.with_name(name)
        if earlier.is_file() and earlier != path:
            logger.info(f"resuming from {earlier} (the name of this checkpoint before {path.name})")
            return str(earlier)
    return os.fspath(last_ckpt)


def prepare_run(
    ckpt_dir: str | os.PathLike, resume: bool | str, last: str = "", best: str = "", starts_from_best: bool = False
) -> None:
    """The resume rule every train config runs first: a rerun continues, never silently starts over.

    - Temporary files that a killed run left behind in ``ckpt_dir`` (Ignite's atomic saves) are
      removed (by the main process only: other ranks may already be saving).
    - ``resume`` off while ``ckpt_dir`` holds checkpoints of an earlier run: refused, since a
      fresh run would replace them (its first, untrained epoch would become the best model).
    - ``resume`` on, a best model there but no checkpoint to continue from (a run killed
      between its first best save and its first last save): refused for the same reason, unless
      the run starts from that best model's weights (``starts_from_best``: MONAI Label's train task
      adds a ``CheckpointLoader`` of ``model.pt``), which makes it a fine-tuning of that model.

    Args:
        ckpt_dir: where the run writes its checkpoints.
        resume: the config's ``resume`` flag.
        last: the checkpoint a rerun continues from (``""``: the newest ``checkpoint_*.pt``).
        best: the best-so-far model the run replaces only by a better one (``""``: none).
        starts_from_best: the run loads ``best`` before training (fine-tuning the served model).

    Raises:
        UsageError: what is there and how to continue or start fresh, in one line.
    """
    from .runtime import UsageError, as_bool

    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return
    if int(os.environ.get("RANK", "0")) == 0:
        for path in folder.iterdir():
            if _IGNITE_TEMPORARY.match(path.name) and path.is_file():
                logger.warning(f"removing {path}: a partial checkpoint left by a run that was stopped while saving")
                path.unlink(missing_ok=True)
    continue_from = last if last else latest_checkpoint(folder)
    earlier = [p for p in (continue_from, best) if p and os.path.isfile(p)]
    earlier += [str(p) for p in sorted(folder.glob("checkpoint_*.pt")) if str(p) not in earlier]
    if not earlier:
        return
    names = ", ".join(os.path.basename(p) for p in earlier)
    start_fresh = f"to start fresh, pass another --ckpt_dir or move {names} away"
    if not as_bool(resume):
        raise UsageError(
            f"{folder}: holds checkpoints of an earlier run ({names}) and resume is off, so this run would "
            f"replace them; rerun with --resume true to continue it, or {start_fresh}"
        )
    if (not continue_from or not os.path.isfile(continue_from)) and not as_bool(starts_from_best):
        raise UsageError(
            f"{folder}: holds {names} of an earlier run but no {os.path.basename(last) or 'checkpoint_*.pt'} "
            f"to continue from (it stopped before its first full checkpoint), so this run would replace "
            f"the best model with untrained weights; {start_fresh}"
        )


def training_state(**objects) -> dict:
    """What a training checkpoint holds: the objects given (``None`` dropped) plus the trainer's
    mixed-precision ``GradScaler`` as ``scaler`` when it has one (MONAI trainers make one when
    ``amp`` is on), so a resumed run continues with the same loss scale.

    Example (config): ``{"_target_": "scripts.checkpoint.training_state", "network": "@network",
    "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler", "trainer": "@train#trainer"}``.
    """
    state = {name: obj for name, obj in objects.items() if obj is not None}
    scaler = getattr(objects.get("trainer"), "scaler", None)
    if scaler is not None:
        state.setdefault("scaler", scaler)
    return state


def resumable_state(state: dict, checkpoint: str | os.PathLike) -> dict:
    """The part of ``state`` that ``checkpoint`` holds, for ``CheckpointLoader``'s ``load_dict``.

    A checkpoint written without mixed precision has no ``scaler``; resuming it with ``amp`` on
    starts a fresh loss scale (logged) instead of failing. Everything else must be there.
    """
    if not checkpoint or not os.path.isfile(checkpoint):  # nothing to resume (CheckpointLoader is disabled)
        return state
    import torch

    try:
        keys = set(torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True))
    except Exception as e:
        raise RuntimeError(f"{checkpoint}: cannot read this checkpoint to resume from it ({e})") from e
    optional = {"scaler"}
    missing = sorted(set(state) - keys - optional)
    if missing:
        raise RuntimeError(f"{checkpoint}: cannot resume, the checkpoint has no {', '.join(missing)}")
    for name in sorted((set(state) & optional) - keys):
        logger.warning(f"{checkpoint} holds no {name}: starting it afresh")
    return {name: obj for name, obj in state.items() if name in keys}


def keep_schedule_length(trainer, lr_scheduler, **attributes) -> None:
    """Set ``attributes`` of ``lr_scheduler`` (e.g. ``T_max=max_epochs``) when ``trainer`` starts.

    Call it after attaching the ``CheckpointLoader``: a resumed run then follows the schedule
    as configured now, not as restored from the checkpoint. Rerunning with a larger
    ``max_epochs`` puts the rate where the longer schedule would have it at the current epoch
    (for a cosine, its closed form) and continues along it, instead of climbing back up past the
    old end or staying at its minimum.
    """
    from ignite.engine import Events

    def refit(_engine) -> None:
        changed = {name: value for name, value in attributes.items() if getattr(lr_scheduler, name) != value}
        if not changed:
            return
        for name, value in changed.items():
            logger.info(f"learning-rate schedule: {name} {getattr(lr_scheduler, name)} -> {value}")
            setattr(lr_scheduler, name, value)
        closed_form = getattr(lr_scheduler, "_get_closed_form_lr", None)
        if closed_form is not None:
            rates = closed_form()
            for group, rate in zip(lr_scheduler.optimizer.param_groups, rates):
                group["lr"] = rate
            lr_scheduler._last_lr = list(rates)
            logger.info(f"learning rate at epoch {lr_scheduler.last_epoch} of the new schedule: {rates[0]:.3g}")

    trainer.add_event_handler(Events.STARTED, refit)


#: what a settings file beside a checkpoint is called: ``model.pt`` -> ``model.pt.settings.json``
SETTINGS_SUFFIX = ".settings.json"
#: inference ids that are a training setting under another name (the sliding window is the patch)
SAME_SETTING = {"roi_size": "patch_size"}


def settings_file(ckpt: str | os.PathLike) -> Path:
    """The training settings file of a checkpoint (:data:`SETTINGS_SUFFIX`)."""
    return Path(os.fspath(ckpt) + SETTINGS_SUFFIX)


def _plain(value: Any) -> Any:
    """A setting as JSON holds it (tuples, tensors and NumPy values as lists and numbers)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def write_training_settings(ckpt: str | os.PathLike, settings: Mapping[str, Any]) -> Path:
    """Write the settings ``ckpt`` was trained with beside it, atomically, with the checkpoint's SHA-256
    (so a file later replaced by other weights is not judged by them).

    Args:
        ckpt: the checkpoint just saved.
        settings: preprocessing and network settings (``spacing``, ``patch_size``, ``hu_min``, ...).

    Returns:
        The settings file (:func:`settings_file`).
    """
    from .runtime import atomic_write_text

    content = {"checkpoint": os.path.basename(os.fspath(ckpt)), "sha256": sha256_of(ckpt),
               "settings": _plain(dict(settings))}
    return atomic_write_text(settings_file(ckpt), json.dumps(content, indent=2) + "\n")


def _same(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(a)), abs(float(b)))
    return a == b


def check_training_settings(ckpt: str | os.PathLike | None, settings: Mapping[str, Any]) -> list[str]:
    """Warn in one log line when ``settings`` differ from those ``ckpt`` was trained with.

    Weights without a settings file (the public release, a hub id, a file copied alone) or whose
    settings file describes other weights (another SHA-256) are not compared, silently.

    Args:
        ckpt: the weights the run loads.
        settings: this run's values, by config id (an inference ``roi_size`` is compared with the
            training ``patch_size``, :data:`SAME_SETTING`).

    Returns:
        One ``"<id> <value here> (trained with <value>)"`` per difference.
    """
    if not ckpt or not os.path.isfile(os.fspath(ckpt)) or not settings_file(ckpt).is_file():
        return []
    try:
        content = json.loads(settings_file(ckpt).read_text())
        trained = content["settings"]
        if content.get("sha256") != sha256_of(ckpt):
            logger.info(f"{settings_file(ckpt)} describes other weights than {ckpt}: settings not compared")
            return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning(f"{settings_file(ckpt)}: unreadable training settings ({e}); settings not compared")
        return []
    differences = []
    for key, value in settings.items():
        name = key if key in trained else SAME_SETTING.get(key, key)
        if name in trained and not _same(value, trained[name]):
            was = f"{name} {_plain(trained[name])}" if name != key else f"{_plain(trained[name])}"
            differences.append(f"{key} {_plain(value)} (trained with {was})")
    if differences:
        logger.warning(f"{ckpt}: this run's settings differ from those the checkpoint was trained with: "
                       f"{'; '.join(differences)}; results may be worse than the model can give")
    return differences
