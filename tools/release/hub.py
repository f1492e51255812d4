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
"""A bundle and its weights as a Hugging Face hub repository, and hub repos made usable offline.

``export`` writes a folder in hub-repo layout that is at the same time

- a CT-FM style ``PyTorchModelHubMixin`` repo: ``model.safetensors`` (the weights, with the
  keys of the network they belong to) + ``config.json`` (that network's constructor
  arguments), the format of the public CT-FM releases, so ``--encoder_ckpt OWNER/NAME`` /
  ``--ckpt OWNER/NAME`` and :func:`ctfm_common.encoder.read_state_dict` load it by repo id;
- the bundle itself (``configs/``, ``scripts/``, ``docs/``, ``LICENSE``, ``large_files.yml``),
  so ``python -m monai.bundle download --source huggingface_hub --repo OWNER/NAME`` gives a
  bundle that runs;
- a model card (``README.md``) made from the bundle's metadata.

Upload it with ``hf upload OWNER/NAME FOLDER .`` (huggingface_hub's CLI; needs a token).

``install`` puts such a folder (or a copy of a public repo fetched elsewhere) into the local
huggingface_hub cache under a repo id, so the repo id resolves on a machine without internet
(``HF_HUB_OFFLINE=1``), exactly as after ``hf download``.

Usage::

    ctfm-hub export --bundle ctfm_wholebody_seg --weights models/model.pt --out hub/wholebody
    ctfm-hub install hub/wholebody --repo_id OWNER/NAME           # default cache
    ctfm-hub install ct_fm_download --repo_id project-lighter/ct_fm_feature_extractor
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ctfm_bundles.tools.release.package_bundles import (
    BUNDLES_DIR,
    NETWORK_CONFIG,
    bundle_files,
    bundle_names,
    read_metadata,
)
from ctfm_common import encoder as enc
from ctfm_common.runtime import atomic_write, atomic_write_text

HUB_WEIGHTS = "model.safetensors"
HUB_CONFIG = "config.json"
# The network a bundle's hub weights belong to: the encoder alone (the exchange format of
# encoder_ckpt) for the encoder bundles, the complete task network for the others.
HUB_NETWORK = {
    "ctfm_pretrain": "SegResEncoder",
    "ctfm_retrieval": "SegResEncoder",
    "ctfm_triage": "TriageClassifier",
    "ctfm_wholebody_seg": "SegResNetDS",
}
# The CT-FM release's own loader of each network, where it has one (lighter-zoo on PyPI).
LIGHTER_ZOO_NOTE = {
    "SegResEncoder": ": `lighter_zoo.SegResEncoder.from_pretrained` loads this repo",
    "SegResNetDS": ": `lighter_zoo.SegResNet.from_pretrained` loads this repo",
}


def hub_weights(bundle: str, state: dict) -> tuple[dict, str, dict]:
    """The tensors for ``model.safetensors``, their network's class name and its ``config.json``, read off the shapes.

    ``config.json`` holds the constructor's keyword arguments and nothing else, as in the CT-FM
    releases: ``lighter_zoo.SegResEncoder`` / ``lighter_zoo.SegResNet`` (``PyTorchModelHubMixin``)
    pass every key of it to the constructor. The class name goes into the weights' header instead.

    Complete task weights (a ``SegResNetDS`` with its heads, a ``TriageClassifier`` with its head and
    thresholds) stay complete; anything else keeps only the shared encoder, with bare keys (the
    exchange format, and the layout of the public CT-FM feature extractor).

    Raises:
        enc.EncoderWeightsError: weights that hold no shared encoder.
    """
    expected = list(enc.build_encoder(init_filters=8).state_dict())  # key names do not depend on the width
    prefix = enc.find_source_prefix(state, expected)
    first = state.get(prefix + "conv_init.weight")
    if first is None:
        raise enc.EncoderWeightsError(f"no shared-encoder weights ('conv_init.weight') among the {bundle} weights")
    width = {"init_filters": int(first.shape[0]), "in_channels": int(first.shape[1])}
    # the task network's own prefix ("", "module.", ...): its encoder sits under "<model>encoder."
    model = prefix[: -len("encoder.")] if prefix.endswith("encoder.") else None
    task = {k[len(model) :]: v for k, v in state.items() if k.startswith(model)} if model is not None else {}
    architecture = HUB_NETWORK.get(bundle, "SegResEncoder")
    heads = sorted(k for k in task if k.startswith("up_layers.") and k.endswith(".head.weight"))
    if architecture == "SegResNetDS" and heads:
        config = dict(enc.ENCODER_ARGS, blocks_down=list(enc.ENCODER_ARGS["blocks_down"]), **width)
        config.update(out_channels=int(task[heads[-1]].shape[0]), dsdepth=len(heads))
        return task, architecture, config
    if architecture == "TriageClassifier" and "head.2.weight" in task:
        config = dict(
            width, hidden_features=int(task["head.0.weight"].shape[0]), num_labels=int(task["head.2.weight"].shape[0])
        )
        return task, architecture, config
    config = dict(enc.ENCODER_ARGS, blocks_down=list(enc.ENCODER_ARGS["blocks_down"]), **width)
    return {k: state[prefix + k] for k in expected}, "SegResEncoder", config


def bundle_model_card(bundle_dir: Path) -> str:
    """The ``## Model card`` section of a bundle's ``docs/README.md`` (intended use, training data,
    evaluation, limitations, licence of the weights): one text for the bundle docs and the hub card."""
    text = (bundle_dir / "docs" / "README.md").read_text()
    start = text.find("\n## Model card\n")
    if start < 0:
        raise ValueError(f"{bundle_dir / 'docs' / 'README.md'} has no '## Model card' section")
    rest = text[start + 1 :]
    end = rest.find("\n## ", 1)
    return (rest if end < 0 else rest[: end + 1]).strip() + "\n"


def model_card(
    meta: dict, bundle: str, architecture: str, config: dict, repo_id: str, weights_name: str, sha256: str
) -> str:
    """A hub model card (README.md with YAML front matter) from the bundle's metadata and model card."""
    fmt = meta.get("network_data_format", {})
    image = fmt.get("inputs", {}).get("image", {})
    pred = fmt.get("outputs", {}).get("pred", {})
    changelog = "\n".join(f"- {v}: {text}" for v, text in meta.get("changelog", {}).items())
    references = "\n".join(f"- {r}" for r in meta.get("references", []))
    arch_args = ", ".join(f"{k}={v}" for k, v in config.items())
    option = "--encoder_ckpt" if architecture == "SegResEncoder" else "--ckpt"
    example = NETWORK_CONFIG.get(bundle, "inference.json")
    width = config.get("init_filters", 32)
    width_note = f" --init_filters {width}" if width != 32 else ""
    return f"""---
license: apache-2.0
library_name: monai
tags:
- monai
- monai-bundle
- medical-imaging
- ct
- ct-fm
- {bundle}
---

# {bundle} {meta.get("version", "")}

{meta.get("task", "")}. {meta.get("description", "")}

**Intended use:** {meta.get("intended_use", "")}

{bundle_model_card(BUNDLES_DIR / bundle)}
## Files

- `{HUB_WEIGHTS}`: weights of `{architecture}({arch_args})`, from `{weights_name}`
  (SHA-256 of the file here: `{sha256}`); `{HUB_CONFIG}`: the same constructor arguments (only
  them, as in the CT-FM releases{LIGHTER_ZOO_NOTE.get(architecture, "")}). The model card above
  is the bundle's: evaluation figures for these particular weights are only those their publisher
  adds here.
- `configs/`, `scripts/`, `docs/`, `LICENSE`, `large_files.yml`: the MONAI bundle
  (`configs/metadata.json` is its metadata; `docs/README.md` its documentation).

## Use

```bash
# the bundle, as a MONAI bundle
python -m monai.bundle download --name {bundle} --source huggingface_hub --repo {repo_id} --bundle_dir .
# these weights by repo id (downloaded into the huggingface_hub cache; offline, from that cache)
python -m monai.bundle run --config_file {bundle}/configs/{example} {option} {repo_id}{width_note}
```
{
        ""
        if width == 32
        else f'''
These weights are {width} filters wide (the contract is 32): every command needs `--init_filters {width}`.
'''
    }
## Input

- {image.get("num_channels", "")} channel(s), {image.get("format", "")} {image.get("modality", "")}, \
spatial shape {image.get("spatial_shape", "")}
- Preprocessing: {image.get("preprocessing", "")}
- Output `pred`: {pred.get("num_channels", "")} channel(s), {pred.get("format", "")}

## Versions

MONAI {meta.get("monai_version", "")}, PyTorch {meta.get("pytorch_version", "")}.

{changelog}

## References

{references}

{meta.get("copyright", "")}. Licensed under the Apache License, Version 2.0.
"""


def export(*, bundle: str, weights: str, out: str, repo_id: str = "OWNER/NAME", overwrite: bool = False) -> str:
    """Write a bundle and its weights as a hub repository folder.

    Args:
        bundle: bundle name under ``bundles/``.
        weights: the weights (``.pt`` read with ``weights_only=True``, ``.safetensors``, a hub folder
            or repo id); for the encoder bundles, encoder weights (e.g. the pretrain export).
        out: the folder to write (it becomes the repo's root).
        repo_id: the repo id the card's commands name.
        overwrite: write into an existing, non-empty folder.

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    bundle_dir = BUNDLES_DIR / bundle
    if not (bundle_dir / "configs" / "metadata.json").is_file():
        raise SystemExit(f"unknown bundle '{bundle}'; bundles are {bundle_names()}")
    folder = Path(out)
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise SystemExit(f"{folder} is not empty (pass --overwrite True to write into it)")
    meta = read_metadata(bundle_dir)
    state, architecture, config = hub_weights(bundle, enc.read_state_dict(weights))
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    header = {"bundle": bundle, "version": str(meta["version"]), "architecture": architecture}
    for rel in bundle_files(bundle_dir):
        data = (bundle_dir / rel).read_bytes()
        atomic_write(folder / rel, lambda tmp, data=data: Path(tmp).write_bytes(data))
    weights_path = atomic_write(folder / HUB_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    atomic_write_text(folder / HUB_CONFIG, json.dumps(config, indent=2) + "\n")
    digest = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    card = model_card(meta, bundle, architecture, config, repo_id, Path(os.fspath(weights)).name, digest)
    atomic_write_text(folder / "README.md", card)
    print(
        f"wrote {folder}: {HUB_WEIGHTS} ({len(tensors)} tensors, {architecture}), {HUB_CONFIG}, "
        f"README.md, the {bundle} bundle"
    )
    return str(folder)


def default_cache_dir() -> Path:
    """huggingface_hub's cache folder (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def install(folder: str, *, repo_id: str, cache_dir: str | None = None, revision: str = "main") -> str:
    """Put a hub-layout folder into the local huggingface_hub cache as ``repo_id`` (offline use).

    The cache layout is huggingface_hub's: ``models--OWNER--NAME/snapshots/<commit>/...`` and
    ``refs/<revision>`` naming the commit; the commit id here is a hash of the folder's content.

    Args:
        folder: the repo's files (from :func:`export`, or a copy of a public repo).
        repo_id: ``owner/name``, e.g. ``project-lighter/ct_fm_feature_extractor``.
        cache_dir: the cache (default: huggingface_hub's, see :func:`default_cache_dir`).
        revision: the ref to point at the snapshot.

    Returns:
        The snapshot folder.
    """
    if not enc.looks_like_repo_id(repo_id):
        raise SystemExit(f"repo_id must be 'owner/name', got '{repo_id}'")
    source = Path(folder)
    files = sorted(p for p in source.rglob("*") if p.is_file() and ".cache" not in p.relative_to(source).parts)
    if not files:
        raise SystemExit(f"{source}: no files to install")
    digest = hashlib.sha1()
    for file in files:
        digest.update(file.relative_to(source).as_posix().encode() + b"\0" + file.read_bytes())
    commit = digest.hexdigest()
    repo_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    repo_dir = repo_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    for file in files:
        data = file.read_bytes()
        atomic_write(snapshot / file.relative_to(source), lambda tmp, data=data: Path(tmp).write_bytes(data))
    atomic_write_text(repo_dir / "refs" / revision, commit)
    print(f"installed {source} as {repo_id} ({revision} -> {commit[:12]}) in {repo_dir.parent}")
    return str(snapshot)


def remove(repo_id: str, *, cache_dir: str | None = None) -> None:
    """Remove a repo from the local cache (the inverse of :func:`install`)."""
    repo_dir = (Path(cache_dir) if cache_dir else default_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    shutil.rmtree(repo_dir, ignore_errors=True)


def cli() -> None:
    """The console command (``[project.scripts]`` of pyproject.toml)."""
    import fire

    fire.Fire({"export": export, "install": install, "remove": remove})


if __name__ == "__main__":
    cli()
