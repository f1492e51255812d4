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
"""Determinism on the CPU: the same seed gives the same first training losses (pretraining and
whole-body fine-tuning, two separate runs each) and the same embeddings (two embedding runs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_bundle

from ctfm_bundles.tools.synthetic import phantom
from ctfm_common import encoder as enc

PRETRAIN = {
    "init_filters": 8,
    "patch_size": [16, 32, 32],
    "num_crops": 3,
    "num_workers": 0,
    "warmup_epochs": 0,
    "log_interval": 1,
    "batch_size": 2,
    "epoch_length": 3,
    "max_epochs": 1,
    "checkpoint_interval": 100,
}
SEG = {
    "init_filters": 8,
    "spacing": [6.0, 6.0, 6.0],
    "patch_size": [32, 32, 32],
    "num_workers": 0,
    "batch_size": 1,
    "val_interval": 1000,
    "train_dice": False,
    "max_epochs": 2,
}
EMBED = {
    "init_filters": 8,
    "patch_size": [16, 32, 32],
    "spacing": [6.0, 6.0, 6.0],
    "overlap": 0.25,
    "batch_size": 2,
    "num_workers": 0,
    "save_patches": True,
}


def losses(log: str) -> list[float]:
    """Every ``train_loss`` value the StatsHandler logged, in order."""
    return [float(v) for v in re.findall(r"train_loss: ([-+0-9.eE]+)", log)]


@pytest.fixture(scope="module")
def body_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("determinism")
    datalist = phantom.make_dataset(
        output_dir=str(root), num_cases=3, kind="body", shape=(48, 40, 32), spacing=(8.0, 8.0, 10.0), seed=5
    )
    content = json.loads(Path(datalist).read_text())
    for item in content["training"] + content["validation"]:
        img = nib.load(root / item["label"])
        relabelled = phantom.to_totalseg_labels(np.asarray(img.dataobj), kind="body")
        nib.save(nib.Nifti1Image(relabelled, img.affine, img.header), root / item["label"])
    return root


def test_pretraining_twice_with_one_seed_logs_the_same_losses(body_data, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = run_bundle(
            "ctfm_pretrain",
            "train.json",
            "training",
            datalist=str(body_data / "datalist.json"),
            dataset_dir=str(body_data),
            output_dir=str(out),
            ckpt_dir=str(out / "models"),
            seed=7,
            **PRETRAIN,
        )
        runs.append(losses(proc.stdout + proc.stderr))
    assert len(runs[0]) == PRETRAIN["epoch_length"] and all(np.isfinite(runs[0]))
    assert runs[0] == runs[1]


def test_fine_tuning_twice_with_one_seed_logs_the_same_losses(body_data, tmp_path):
    torch.manual_seed(0)
    encoder = enc.save_encoder_weights(enc.build_encoder(init_filters=8), tmp_path / "encoder.safetensors")
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = run_bundle(
            "ctfm_wholebody_seg",
            "train.json",
            "training",
            datalist=str(body_data / "datalist.json"),
            dataset_dir=str(body_data),
            output_dir=str(out),
            ckpt_dir=str(out / "models"),
            encoder_ckpt=str(encoder),
            seed=3,
            **SEG,
        )
        runs.append(losses(proc.stdout + proc.stderr))
    assert len(runs[0]) >= 2 * SEG["max_epochs"] and all(np.isfinite(runs[0]))
    assert runs[0] == runs[1]


def test_embedding_twice_gives_identical_arrays(body_data, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    encoder = enc.save_encoder_weights(enc.build_encoder(init_filters=8), tmp_path / "encoder.safetensors")
    images = sorted((body_data / "imagesTr").glob("*.nii.gz"))
    outputs = []
    for name in ("a", "b"):
        run_bundle(
            "ctfm_retrieval",
            "embed.json",
            input=str(body_data / "imagesTr" / "*.nii.gz"),
            output_dir=str(tmp_path / name),
            encoder_ckpt=str(encoder),
            **EMBED,
        )
        outputs.append(
            {p.name: load_file(str(p)) for p in sorted((tmp_path / name / "embeddings").glob("*.safetensors"))}
        )
    assert len(outputs[0]) == len(images) > 1 and sorted(outputs[0]) == sorted(outputs[1])
    for name, tensors in outputs[0].items():
        assert set(tensors) == {"embedding", "patch_embeddings", "patch_centers_world"}
        for key, value in tensors.items():
            assert torch.equal(value, outputs[1][name][key]), (name, key)
