# GENERATED from ctfm_common/encoder.py by ctfm-sync-bundles: edit the source, not this copy.
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
"""The shared encoder contract: build MONAI's ``SegResEncoder`` and load its weights.

Weights are a state dict whose keys are exactly ``SegResEncoder().state_dict()`` keys,
read from

- a ``.safetensors`` file (preferred),
- a ``torch.save`` file, always read with ``weights_only=True``,
- a Hugging Face ``PyTorchModelHubMixin`` folder (``config.json`` + ``model.safetensors``),
  the format of the public CT-FM release, or
- a hub repo id such as ``project-lighter/ct_fm_feature_extractor`` (downloaded with
  ``huggingface_hub`` when the hub is reachable).

They load into a bare ``SegResEncoder`` or into the ``encoder.`` part of any network that
holds one (``SegResNetDS``, :class:`PooledEncoderHead`), with strict key and shape checks
and a report of what was loaded. MONAI's ``CheckpointLoader(strict_shape=False)`` is not
used: in MONAI 1.6.1 it silently loads nothing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.networks.nets.segresnet_ds import SegResEncoder
from torch import nn

from .runtime import atomic_write

logger = logging.getLogger(__name__)

# The contract (DESIGN.md): every bundle builds its encoder with exactly these arguments;
# only ``init_filters`` may be lowered for tests.
ENCODER_ARGS: dict = {"spatial_dims": 3, "in_channels": 1, "init_filters": 32, "blocks_down": (1, 2, 2, 4, 4)}
EMBEDDING_DIM_PER_FILTER = 16  # last level has init_filters * 2**4 channels: 512 for 32 filters

# Public releases whose weights hold the shared encoder.
PUBLIC_WEIGHTS = {
    "project-lighter/ct_fm_feature_extractor": "SegResEncoder (the CT-FM foundation model)",
    "project-lighter/whole_body_segmentation": "SegResNetDS(out_channels=118, dsdepth=4), encoder under 'encoder.'",
    "project-lighter/ct_fm_segresnet": "SegResNetDS built on the CT-FM encoder",
}

# Prefixes under which an encoder's keys are found in checkpoints of this project and of
# the public CT-FM releases; tried in this order.
KNOWN_PREFIXES = ("", "encoder.", "module.encoder.", "model.encoder.", "backbone.", "model.backbone.", "module.")

WEIGHT_FILE_NAMES = ("model.safetensors", "encoder.safetensors", "pytorch_model.bin", "model.pt", "encoder.pt")


class EncoderWeightsError(ValueError):
    """Raised when encoder weights cannot be read or do not match the network."""


class WeightsNotFoundError(SystemExit):
    """Weights that are not there, said in one line with the commands that get them.

    A ``SystemExit``: ``python -m monai.bundle run`` then ends with this one line (exit status 1)
    instead of a long traceback, because MONAI's config evaluation wraps every ``Exception`` but
    lets ``SystemExit`` through. Python callers catch it as ``WeightsNotFoundError``.

    Args:
        message: what is missing and how to get it (one line).
        path: the missing path.
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:
        return str(self.code)


def bundle_folder_of(path: str | os.PathLike) -> Path | None:
    """The bundle folder (holding ``large_files.yml`` and ``configs/``) that ``path`` sits in, if any."""
    for folder in Path(os.path.abspath(os.fspath(path))).parents:
        if (folder / "large_files.yml").is_file() and (folder / "configs").is_dir():
            return folder
    return None


def missing_weights(
    path: str | os.PathLike, what: str = "weights", release: str = "", train: str = ""
) -> WeightsNotFoundError:
    """The :class:`WeightsNotFoundError` for ``path``: what is missing and the commands that get weights.

    Args:
        path: the missing file or folder.
        what: what the weights are (``"whole-body model weights"``).
        release: public hub repo id with such weights (``project-lighter/whole_body_segmentation``).
        train: how to make them instead (``"train them with configs/train.json"``).
    """
    text = os.fspath(path)
    steps = []
    bundle = bundle_folder_of(text)
    if bundle is not None and release:
        steps.append(f"`python -m monai.bundle download_large_files --bundle_path {bundle}` (puts the public "
                     f"release {release} in {bundle / 'models'})")
    if release:
        steps.append(f"pass the hub id (`{release}`) or a downloaded file, e.g. "
                     f"`huggingface-cli download {release} --local-dir {release.split('/')[-1]}`")
    if train:
        steps.append(train)
    hint = "; or ".join(steps) if steps else "pass an existing file"
    return WeightsNotFoundError(f"{what} not found: {text}. Get them: {hint}.", text)


def default_weights(*candidates: str | os.PathLike) -> str:
    """The first of ``candidates`` that exists, or ``""`` (none: random init, logged by the loader).

    Configs default ``encoder_ckpt`` to where ``download_large_files`` puts the public release.
    """
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            return os.fspath(candidate)
    return ""


def build_encoder(init_filters: int = 32, in_channels: int = 1) -> SegResEncoder:
    """Build the shared encoder with the contract's fixed arguments.

    Args:
        init_filters: width of the first level (32 is the contract; tests may use 8).
        in_channels: input channels (1 for CT; more for multi-window input).

    Returns:
        A ``SegResEncoder`` with batch norm and ReLU (MONAI's defaults).
    """
    args = dict(ENCODER_ARGS, init_filters=init_filters, in_channels=in_channels)
    return SegResEncoder(**args)


def embedding_dim(init_filters: int = 32) -> int:
    """Channels of the encoder's last feature level (the embedding size): 512 for 32 filters."""
    return init_filters * EMBEDDING_DIM_PER_FILTER


class PooledEncoderHead(nn.Module):
    """Shared encoder -> global average pool of the last level -> optional MLP head.

    With ``out_features=None`` it returns the embedding (512-d for the contract). With a
    head it is the CT-FM projection head (512 -> 256 -> ReLU -> 128, no batch norm) for
    pretraining, or the classification head for triage. Encoder keys sit under
    ``encoder.`` as in ``SegResNetDS``.

    Args:
        init_filters: encoder width.
        in_channels: input channels.
        hidden_features: width of the head's hidden layer.
        out_features: head outputs; ``None`` for no head.
    """

    def __init__(
        self,
        init_filters: int = 32,
        in_channels: int = 1,
        hidden_features: int = 256,
        out_features: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder = build_encoder(init_filters=init_filters, in_channels=in_channels)
        self.pool = nn.AdaptiveAvgPool3d(1)
        dim = embedding_dim(init_filters)
        self.head: nn.Module = nn.Identity()
        if out_features is not None:
            self.head = nn.Sequential(
                nn.Linear(dim, hidden_features), nn.ReLU(inplace=True), nn.Linear(hidden_features, out_features)
            )
        self._register_load_state_dict_pre_hook(self._accept_bare_encoder_keys)

    @staticmethod
    def _accept_bare_encoder_keys(state_dict, prefix, *args) -> None:
        """Let ``load_state_dict`` take the exchange format (bare ``SegResEncoder`` keys) too.

        ``encoder_ckpt`` files hold the encoder's keys without the ``encoder.`` prefix; a head-less
        network is exactly that encoder, so MONAI's ``ckpt_export`` (a strict ``load_state_dict``) can
        export it from such a file. Only applies when no key of the state dict carries a known part.
        """
        own = [k for k in state_dict if k.startswith(prefix)]
        if not own or any(k[len(prefix):].startswith(("encoder.", "head.", "pool.")) for k in own):
            return
        for key in own:
            state_dict[f"{prefix}encoder.{key[len(prefix):]}"] = state_dict.pop(key)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding of a batch of volumes: (B, C, D, H, W) -> (B, 512)."""
        return self.pool(self.encoder(x)[-1]).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


@dataclass
class LoadReport:
    """What a weight load did; ``str(report)`` is its one log line.

    The same line for both kinds of weights (``kind``: ``"encoder weights"`` or ``"model weights"``):
    where they came from, how many tensors loaded into which part of the network, and the keys
    that were missing, of the wrong shape or not used.
    """

    source: str
    target_prefix: str
    source_prefix: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    kind: str = "encoder weights"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatched)

    def __str__(self) -> str:
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" ... (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = [
            f"{self.kind} from {self.source}: {len(self.loaded)} tensors loaded into "
            f"'{self.target_prefix or '<network>'}' (source prefix '{self.source_prefix}')"
        ]
        if self.missing:
            parts.append(f"missing in the file ({len(self.missing)}): {head(self.missing)}")
        if self.mismatched:
            parts.append(f"shape mismatch ({len(self.mismatched)}): {head(self.mismatched)}")
        if self.unexpected:
            parts.append(f"not part of the network, ignored ({len(self.unexpected)}): {head(self.unexpected)}")
        return "; ".join(parts)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise EncoderWeightsError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {e}") from e


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad pickles / zip archives
        raise EncoderWeightsError(
            f"{path}: not a readable torch state-dict file (truncated, corrupt, or it holds objects that "
            f"weights_only=True refuses): {e}"
        ) from e
    # unwrap the usual checkpoint containers ({"state_dict": ...}, Ignite's {"network": ...})
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [v for k, v in obj.items() if isinstance(v, Mapping) and k in ("state_dict", "model", "network", "encoder")]
        if len(nested) != 1:
            break
        obj = nested[0]
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EncoderWeightsError(f"{path}: holds no state dict of tensors (found {type(obj).__name__}).")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _read_hub_folder(path: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILE_NAMES:
        if (path / name).is_file():
            config = path / "config.json"
            if config.is_file():
                try:
                    logger.info(f"{path}: hub config {json.loads(config.read_text())}")
                except json.JSONDecodeError as e:
                    raise EncoderWeightsError(f"{config}: invalid JSON: {e}") from e
            return read_state_dict(path / name)
    raise EncoderWeightsError(f"{path}: folder holds none of the weight files {', '.join(WEIGHT_FILE_NAMES)}.")


def looks_like_repo_id(source: str) -> bool:
    """True for ``owner/name`` strings that are not existing paths."""
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and not os.path.exists(source)


def download_from_hub(repo_id: str, *, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """Download a hub repo's weights (``*.safetensors`` + ``config.json``) and return its local folder.

    Uses the local huggingface_hub cache first, so a repo downloaded once (or placed there by
    ``huggingface_hub``) keeps working offline.

    Raises:
        EncoderWeightsError: when the repo can be neither found in the cache nor downloaded,
            with instructions to pass a local file instead.
    """
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "config.json"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns))
    except Exception as online_error:  # offline, unknown repo, proxy...: try the cache before giving up
        try:
            return Path(
                snapshot_download(
                    repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns, local_files_only=True
                )
            )
        except Exception:
            raise EncoderWeightsError(
                f"cannot download '{repo_id}' from the Hugging Face hub ({type(online_error).__name__}: "
                f"{online_error}). On a machine without internet access, download it elsewhere with "
                f"`huggingface-cli download {repo_id} --local-dir ct_fm` (or from the model page) and pass the "
                f"local folder or its model.safetensors instead, e.g. `--encoder_ckpt ct_fm/model.safetensors`."
            ) from online_error


def read_state_dict(source: str | os.PathLike, *, cache_dir: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a weights file, a hub-format folder or a hub repo id.

    Args:
        source: ``.safetensors`` file, torch file (``.pt``/``.pth``/``.bin``/``.ckpt``), a folder with
            ``model.safetensors`` (+ ``config.json``), or a hub repo id ``owner/name``.
        cache_dir: huggingface_hub cache folder for repo ids (default: the hub's own).

    Returns:
        The tensors by key, on the CPU.

    Raises:
        WeightsNotFoundError: a path that does not exist and is no repo id (one line, the commands
            that get weights).
        EncoderWeightsError: a file that is truncated, corrupt or holds no tensors.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _read_hub_folder(path)
    if path.is_file():
        if path.stat().st_size == 0:
            raise EncoderWeightsError(f"{path}: the weights file is empty (0 bytes); was a download interrupted?")
        if path.suffix == ".safetensors":
            return _read_safetensors(path)
        return _read_torch(path)
    if looks_like_repo_id(text):
        return _read_hub_folder(download_from_hub(text, cache_dir=cache_dir))
    raise missing_weights(text, "encoder weights", release="project-lighter/ct_fm_feature_extractor",
                          train="pretrain your own with the ctfm_pretrain bundle")


def weights_file(source: str | os.PathLike, *, cache_dir: str | None = None) -> Path:
    """The one file that holds the weights of ``source`` (a file, a hub-format folder, a hub repo id)."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if not path.is_dir() and looks_like_repo_id(text):
        path = download_from_hub(text, cache_dir=cache_dir)
    if path.is_dir():
        for name in WEIGHT_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        raise EncoderWeightsError(f"{path}: folder holds none of the weight files {', '.join(WEIGHT_FILE_NAMES)}.")
    raise FileNotFoundError(
        f"encoder weights not found: '{text}' is neither an existing file or folder nor a hub repo id."
    )


_DIGESTS: dict[tuple[str, int, int], str] = {}


def weights_digest(source: str | os.PathLike, *, cache_dir: str | None = None) -> str:
    """SHA-256 of the weights file behind ``source`` (``""`` for an empty source: random init).

    What identifies weights is their content, not their path: a file overwritten with other
    weights at the same path gets another digest (embeddings made with it are then stale).
    """
    if not os.fspath(source):
        return ""
    from .download import sha256_of

    path = weights_file(source, cache_dir=cache_dir)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_of(path)
    return _DIGESTS[key]


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or the network itself)."""
    return network.module if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else network


def encoder_of(network: nn.Module) -> tuple[nn.Module, str]:
    """Return the ``SegResEncoder`` inside ``network`` and its key prefix (``""`` or ``"encoder."``)."""
    module = unwrap(network)
    if isinstance(module, SegResEncoder):
        return module, ""
    encoder = getattr(module, "encoder", None)
    if isinstance(encoder, SegResEncoder):
        return encoder, "encoder."
    raise TypeError(
        f"{type(module).__name__} holds no SegResEncoder (expected a SegResEncoder or a network with an "
        f"'encoder' attribute, such as SegResNetDS)."
    )


def find_source_prefix(state: Mapping[str, torch.Tensor], expected: list[str]) -> str:
    """Find the prefix under which the encoder keys ``expected`` sit in ``state``.

    Tries :data:`KNOWN_PREFIXES`, then any prefix inferred from the first expected key;
    returns the one that covers the most expected keys.
    """
    candidates = list(KNOWN_PREFIXES)
    anchor = expected[0]
    candidates += [k[: -len(anchor)] for k in state if k.endswith(anchor)]
    return max(dict.fromkeys(candidates), key=lambda p: sum(p + k in state for k in expected))


#: The first convolution of the shared encoder: the one tensor whose shape depends on ``in_channels``.
FIRST_CONV_KEY = "conv_init.weight"


def inflate_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Replicate a 1-channel conv kernel ``(out, 1, k, k, k)`` over ``in_channels``, divided by ``in_channels``.

    A network fed ``in_channels`` copies of one image then computes exactly what the 1-channel
    network computes on that image (used for multi-window input, e.g. head-CT triage).
    """
    if weight.shape[1] == in_channels:
        return weight
    if weight.shape[1] != 1:
        raise ValueError(f"can only inflate a 1-channel first convolution, got {tuple(weight.shape)}")
    return weight.repeat(1, in_channels, *([1] * (weight.ndim - 2))) / in_channels


def _match(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], report: LoadReport) -> dict:
    """Fill ``report`` with the keys of ``own`` found in ``state`` (under its source prefix); return those."""
    prefix = report.source_prefix
    matched: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        value = state.get(prefix + key)
        if value is None:
            report.missing.append(key)
        elif tuple(value.shape) != tuple(target.shape):
            report.mismatched.append(f"{key} file {tuple(value.shape)} vs network {tuple(target.shape)}")
        else:
            matched[key] = value
    used = {prefix + k for k in own}
    report.unexpected = [k for k in state if k not in used]
    report.loaded = list(matched)
    return matched


def load_encoder_weights(
    network: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], *, strict: bool = True
) -> LoadReport:
    """Load shared-encoder weights into ``network`` (a ``SegResEncoder`` or a network holding one).

    Every encoder key must be present with the right shape (``strict``); keys of the file that
    are not part of the encoder (a segmentation decoder, a projection head) are reported and
    ignored. A 1-channel first convolution is inflated to a network with more input channels
    (:func:`inflate_first_conv`, logged). The network is left untouched when the check fails.

    Args:
        network: ``SegResEncoder``, ``SegResNetDS``, :class:`PooledEncoderHead`, or any module whose
            ``encoder`` attribute is a ``SegResEncoder`` (DDP-wrapped modules too).
        source: path, hub folder, repo id (see :func:`read_state_dict`) or an in-memory state dict.
        strict: raise on missing or mismatched keys (default). With ``False`` the matching
            tensors load and the report lists the rest.

    Returns:
        The :class:`LoadReport` (also logged, one line).

    Raises:
        EncoderWeightsError: missing or mismatched keys (strict), or an unreadable file.
    """
    encoder, target_prefix = encoder_of(network)
    name = "<state dict>" if isinstance(source, Mapping) else os.fspath(source)
    state = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    own = encoder.state_dict()
    expected = list(own)
    prefix = find_source_prefix(state, expected)
    first = state.get(prefix + FIRST_CONV_KEY)
    in_channels = encoder.conv_init.in_channels
    if first is not None and first.ndim > 1 and first.shape[1] == 1 and in_channels > 1:
        state[prefix + FIRST_CONV_KEY] = inflate_first_conv(first, in_channels)
        logger.info(f"{name}: first convolution inflated from 1 to {in_channels} input channels "
                    f"(kernel replicated / {in_channels})")
    report = LoadReport(source=name, target_prefix=target_prefix, source_prefix=prefix)
    matched = _match(state, own, report)
    if not matched:
        raise EncoderWeightsError(
            f"{name}: no encoder weights found ({len(state)} tensors, none matching the shared SegResEncoder "
            f"keys such as '{expected[0]}'). Is this a CT-FM encoder checkpoint? {report}"
        )
    if strict and not report.ok:
        raise EncoderWeightsError(f"{name}: does not match the shared encoder (init_filters, in_channels?): {report}")
    own.update(matched)
    encoder.load_state_dict(own, strict=True)
    logger.info(str(report))
    return report


def load_encoder(
    network: nn.Module, encoder_ckpt: str | os.PathLike | None, *, random_init_ok: bool = False
) -> nn.Module:
    """The config route for encoder weights: load ``encoder_ckpt`` strictly, or say loudly that there are none.

    Every bundle's configs call it the same way, ``$scripts.encoder.load_encoder(@network, @encoder_ckpt)``.

    Args:
        network: a network holding the shared encoder (DDP-wrapped too).
        encoder_ckpt: weights (file, hub folder or repo id, see :func:`read_state_dict`); empty keeps
            the random initialisation (a warning says so).
        random_init_ok: random initialisation is the usual start (pretraining): logged as
            information, not as a warning.

    Returns:
        The network.
    """
    if encoder_ckpt:
        load_encoder_weights(network, encoder_ckpt, strict=True)
    elif random_init_ok:
        logger.info("encoder_ckpt is empty: the encoder starts from its random initialisation")
    else:
        logger.warning("!!! encoder_ckpt is empty: the encoder is RANDOMLY INITIALISED (no pretrained features). "
                       "Pass --encoder_ckpt (the pretrain bundle's encoder.safetensors or the CT-FM release). !!!")
    return network


def load_model_weights(
    network: nn.Module,
    ckpt: str | os.PathLike | None,
    *,
    what: str = "model weights",
    release: str = "",
    train: str = "train them with configs/train.json and pass --ckpt",
    settings: str = "init_filters",
) -> nn.Module:
    """The config route for complete task-model weights (evaluate, inference): strict, with the one-line report.

    ``ckpt`` may be a ``.safetensors`` file, a torch file (read with ``weights_only=True``; training
    checkpoints ``{"model": ..., "optimizer": ...}`` are unwrapped), a hub-format folder or a hub
    repo id. Keys may carry a prefix (``model.``, ``module.``); keys of the file that the network
    lacks are reported and ignored. Every key of the network must be there with its shape.

    Args:
        network: the task network (DDP-wrapped too).
        ckpt: the weights; empty or ``None`` keeps the random initialisation (logged loudly).
        what: what the weights are, for messages (``"whole-body model weights"``).
        release: public hub repo id with such weights, offered when ``ckpt`` is missing.
        train: how to make them instead, offered when ``ckpt`` is missing.
        settings: the settings that change the network's shape, named when the weights do not fit.

    Returns:
        The network.

    Raises:
        WeightsNotFoundError: a ``ckpt`` path that does not exist: one line with the commands that get
            weights (a ``SystemExit``, so ``monai.bundle run`` prints no traceback).
        EncoderWeightsError: keys or shapes that do not match the network (one line).
    """
    if not ckpt:
        logger.warning("ckpt is empty: the network keeps its RANDOM initialisation (untrained outputs)")
        return network
    text = os.fspath(ckpt)
    if not os.path.exists(text) and not looks_like_repo_id(text):
        raise missing_weights(text, what, release=release, train=train)
    module = unwrap(network)
    state = read_state_dict(text)
    own = module.state_dict()
    report = LoadReport(source=text, target_prefix="", source_prefix=find_source_prefix(state, list(own)),
                        kind=what)
    matched = _match(state, own, report)
    if not report.ok:
        raise EncoderWeightsError(f"{text}: does not match the network ({settings}?): {report}")
    module.load_state_dict(matched, strict=True)
    logger.info(str(report))
    return network


class FreezeEncoder:
    """Ignite handler: keep the shared encoder fixed for the first epochs, or throughout.

    The one freezing schedule of every bundle that fine-tunes the encoder (``freeze_encoder_epochs``):

    - ``epochs == 0``: the encoder trains from the start (the handler does nothing);
    - ``epochs == N > 0``: frozen for epochs 1..N, trained from epoch N+1 (the new head or
      decoder first adapts to the pretrained features);
    - ``epochs < 0``: frozen throughout, a linear probe of the pretrained features.

    Frozen means no gradients for the encoder's parameters (``requires_grad`` off), and, unless
    ``update_batch_norm``, batch norm in eval mode, so its running statistics stay those of the
    loaded weights: the encoder then computes exactly the pretrained features. The trainer calls
    ``network.train()`` every iteration, so the encoder is put in eval mode just before each of
    its forward passes while it is frozen. With ``update_batch_norm`` the encoder's batch-norm
    statistics keep following the new data (the layers stay in training mode).

    Args:
        network: a network holding the shared ``SegResEncoder`` (DDP / DataParallel-wrapped too).
        epochs: see above.
        update_batch_norm: let batch-norm statistics update while the weights are frozen.
    """

    def __init__(self, network: nn.Module, epochs: int = 0, update_batch_norm: bool = False) -> None:
        self.encoder, _ = encoder_of(network)
        self.epochs = int(epochs)
        self.update_batch_norm = bool(update_batch_norm)
        self.frozen = False
        self.encoder.register_forward_pre_hook(self._keep_statistics)

    def _keep_statistics(self, encoder: nn.Module, args) -> None:
        if self.frozen and not self.update_batch_norm and encoder.training:
            encoder.eval()

    def attach(self, engine) -> None:
        """Register with the trainer (at the start of every epoch)."""
        from ignite.engine import Events

        if self.epochs != 0:
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        epoch = engine.state.epoch
        frozen = self.epochs < 0 or epoch <= self.epochs
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(not frozen)
        if not frozen and self.frozen:
            self.encoder.train()
        if frozen != self.frozen or epoch == 1:
            statistics = "" if not frozen else (", batch-norm statistics updating" if self.update_batch_norm
                                                 else ", batch-norm statistics fixed")
            logger.info(f"epoch {epoch}: encoder {'frozen' if frozen else 'trained'}{statistics}")
        self.frozen = frozen


def save_encoder_weights(network: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write the encoder part of ``network`` as a ``.safetensors`` file, atomically.

    The keys are bare ``SegResEncoder`` keys, the contract's exchange format.

    Args:
        network: a ``SegResEncoder`` or a network holding one.
        path: output file (``.safetensors``).
        metadata: string key/values stored in the file header (e.g. ``{"init_filters": "32"}``).

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    encoder, _ = encoder_of(network)
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
