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
"""The MONAI Model Zoo's CI checks (``ci/verify_bundle.py``), performed offline with MONAI's own API.

What the zoo verifies for a bundle (its ``full`` mode): the necessary files ``configs/metadata.json``
and ``LICENSE``; the preferred files ``models/model.pt`` and ``configs/inference.json``; the version
listed in the changelog; the metadata against the zoo schema; the inference workflow's properties
(``create_workflow(workflow_type="inference", ...).check_properties()``) for the apps the metadata
declares in ``supported_apps`` (here: for every bundle with an inference config, whose ``evaluator``
then really runs on a phantom); ``verify_net_in_out`` and ``ckpt_export`` of the inference config's
``network_def`` from ``models/model.pt``. Here each bundle is copied to ``tmp_path`` (as after a zoo
download), ``models/model.pt`` is written from random weights (no weights are committed) and the
same calls run at ``init_filters`` 8. A bundle without ``configs/inference.json`` must say why in its
docs (:data:`EXEMPT`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_NAMES, BUNDLES_DIR, META_SCHEMA
from monai.bundle import ConfigParser, ckpt_export, create_workflow, verify_metadata, verify_net_in_out
from monai.networks.nets.segresnet_ds import SegResEncoder

from ctfm_bundles.tools import bundle_scripts_switch, use_bundle_scripts
from ctfm_common.encoder import save_encoder_weights

# Bundles without configs/inference.json, and the sentence their docs/README.md must carry.
EXEMPT = {"ctfm_pretrain": "no `configs/inference.json`"}
INIT_FILTERS = 8


@pytest.fixture
def bundle_copy(tmp_path):
    """Copy a bundle alone (no weights), make its ``scripts`` importable as ``monai.bundle run`` does."""
    copies = []

    def make(bundle: str) -> Path:
        dst = tmp_path / bundle
        shutil.copytree(BUNDLES_DIR / bundle, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pt", "*.ts"))
        use_bundle_scripts(dst)
        copies.append(dst)
        return dst

    with bundle_scripts_switch():
        yield make


def width_overrides(meta: dict) -> dict:
    """``init_filters`` 8, and the embedding width the metadata then expects (16 x init_filters)."""
    override = {"init_filters": INIT_FILTERS}
    pred = meta["network_data_format"]["outputs"]["pred"]
    if pred.get("format") == "embedding":
        override["_meta_#network_data_format#outputs#pred#num_channels"] = 16 * INIT_FILTERS
    return override


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_zoo_ci_checks_pass_offline(bundle, bundle_copy):
    root = bundle_copy(bundle)
    meta = json.loads((root / "configs/metadata.json").read_text())
    # necessary and preferred files
    assert (root / "configs/metadata.json").is_file() and (root / "LICENSE").is_file()
    inference = root / "configs" / "inference.json"
    if bundle in EXEMPT:
        assert not inference.exists()
        assert EXEMPT[bundle] in (root / "docs/README.md").read_text(), f"{bundle} docs must say why it is exempt"
        return
    assert inference.is_file(), f"{bundle}: the zoo's CI expects configs/inference.json"
    # version and changelog
    assert meta["version"] in meta["changelog"]
    # metadata against the schema the project carries
    verify_metadata(meta_file=str(root / "configs/metadata.json"), filepath=str(META_SCHEMA))
    # the inference workflow's properties (MONAI's InferProperties): checked for every bundle, not
    # only where supported_apps is declared (the evaluator really runs: test_inference_evaluator_runs)
    workflow = create_workflow(
        workflow_type="infer", config_file=str(inference), meta_file=str(root / "configs/metadata.json"),
        logging_file=str(root / "configs/logging.conf"), bundle_root=str(root), init_filters=INIT_FILTERS,
    )
    assert workflow.check_properties() == [], f"{bundle}: inference.json lacks MONAI inference properties"
    override = width_overrides(meta)
    verify_net_in_out(net_id="network_def", meta_file=str(root / "configs/metadata.json"), config_file=str(inference),
                      bundle_root=str(root), device="cpu", p=1, n=1, any=1, **override)
    if bundle == "ctfm_retrieval":
        return  # its ckpt_export from models/model.pt: test_retrieval_ckpt_export_works_on_the_exported_encoder
    # models/model.pt: random weights of the network_def (none are committed)
    parser = ConfigParser()
    parser.read_config(str(inference))
    parser.update({"bundle_root": str(root), "init_filters": INIT_FILTERS})
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def").eval()
    (root / "models").mkdir(exist_ok=True)
    torch.save(network.state_dict(), root / "models" / "model.pt")
    # the zoo calls ckpt_export without ckpt_file: models/model.pt under bundle_root
    ckpt_export(net_id="network_def", filepath=str(root / "models/verify_model.ts"),
                meta_file=str(root / "configs/metadata.json"), config_file=str(inference), bundle_root=str(root),
                init_filters=INIT_FILTERS)
    scripted = torch.jit.load(str(root / "models/verify_model.ts"))
    x = torch.rand(1, meta["network_data_format"]["inputs"]["image"]["num_channels"], 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), network(x))


def test_retrieval_ckpt_export_works_on_the_exported_encoder(bundle_copy, tmp_path):
    """The bundle's own exchange format (bare ``SegResEncoder`` keys in ``.safetensors``) -> model.pt -> TorchScript."""
    root = bundle_copy("ctfm_retrieval")
    torch.manual_seed(1)
    encoder = SegResEncoder(spatial_dims=3, in_channels=1, init_filters=INIT_FILTERS, blocks_down=(1, 2, 2, 4, 4)).eval()
    weights = save_encoder_weights(encoder, tmp_path / "encoder.safetensors")
    config = str(root / "configs/inference.json")
    parser = ConfigParser()  # what `monai.bundle run save_model` runs
    parser.read_config(config)
    parser.update({"bundle_root": str(root), "encoder_ckpt": str(weights), "init_filters": INIT_FILTERS})
    parser.get_parsed_content("save_model")
    assert (root / "models/model.pt").is_file()
    ckpt_export(net_id="network_def", filepath=str(root / "models/model.ts"), config_file=config,
                bundle_root=str(root), init_filters=INIT_FILTERS)
    # a torch file with the bare encoder keys (no "encoder." prefix) exports as well
    torch.save(encoder.state_dict(), tmp_path / "bare.pt")
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "bare.ts"), ckpt_file=str(tmp_path / "bare.pt"),
                config_file=config, bundle_root=str(root), init_filters=INIT_FILTERS)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected = encoder(x)[-1].mean(dim=(2, 3, 4))
        for path in (root / "models/model.ts", tmp_path / "bare.ts"):
            torch.testing.assert_close(torch.jit.load(str(path))(x), expected, rtol=1e-4, atol=1e-5)


# Per bundle: overrides that make its inference tiny, and what one phantom's prediction must look like.
EVALUATOR_RUNS = {
    "ctfm_wholebody_seg": {"spacing": [8.0, 8.0, 8.0], "roi_size": [32, 32, 32], "progress": False},
    "ctfm_triage": {"spacing": [8.0, 8.0, 8.0], "roi_size": [16, 32, 32], "num_workers": 0},
    "ctfm_retrieval": {"spacing": [8.0, 8.0, 8.0], "patch_size": [16, 32, 32], "num_workers": 0},
}


@pytest.mark.parametrize("bundle", sorted(EVALUATOR_RUNS))
def test_inference_evaluator_runs_on_a_phantom(bundle, bundle_copy, tmp_path):
    """The ``evaluator`` an app finds through MONAI's properties is the bundle's inference (same
    preprocessing, network, inferer and postprocessing): it runs on a phantom CT and predicts what
    ``run`` predicts in kind (a label map on the input grid, probabilities, an embedding)."""
    import nibabel as nib
    import numpy as np
    from ctfm_bundles.tools.synthetic.phantom import make_body_phantom

    root = bundle_copy(bundle)
    image, _, affine = make_body_phantom(shape=(24, 24, 16), spacing=(8.0, 8.0, 8.0), noise_hu=0.0)
    scan = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(scan))
    workflow = create_workflow(
        workflow_type="infer", config_file=str(root / "configs/inference.json"),
        meta_file=str(root / "configs/metadata.json"), logging_file=str(root / "configs/logging.conf"),
        bundle_root=str(root), input=str(scan), init_filters=INIT_FILTERS, device="cpu", amp=False,
        **EVALUATOR_RUNS[bundle],
    )
    assert workflow.check_properties() == []
    torch.manual_seed(0)
    evaluator = workflow.evaluator
    evaluator.run()
    (output,) = evaluator.state.output
    pred = output["pred"]
    if bundle == "ctfm_wholebody_seg":  # an integer label map on the input's grid and affine
        assert tuple(pred.shape) == (1, *image.shape) and pred.dtype == torch.uint8
        np.testing.assert_allclose(np.asarray(pred.affine), affine, atol=1e-4)
    elif bundle == "ctfm_triage":  # one probability per label
        assert tuple(pred.shape) == (1,) and 0.0 <= float(pred[0]) <= 1.0
    else:  # the scan's embedding, 16 x init_filters wide
        assert tuple(pred.shape) == (16 * INIT_FILTERS,) and torch.isfinite(pred).all()


# MONAI's TrainProperties each train config does not meet, and why (also in each bundle's docs). The
# required ones (bundle_root, device, dataset_dir, trainer, max_epochs, train_dataset, train_inferer)
# are met by all three; these optional ones are named differently on purpose:
TRAIN_PROPERTY_EXCEPTIONS = {
    # the datasets apply `train#transforms` / `validate#transforms` (preprocessing + augmentation),
    # while MONAI expects `train#preprocessing` there; `train#preprocessing` is the recipe's
    # deterministic part, shared with validation and evaluation
    "ctfm_wholebody_seg": {"train_preprocessing", "val_preprocessing"},
    # the same, and the evaluator's handlers are the top-level `val_handlers` (evaluate.json replaces them)
    "ctfm_triage": {"train_preprocessing", "val_preprocessing", "val_handlers"},
    "ctfm_pretrain": set(),
}


@pytest.mark.parametrize("bundle", sorted(TRAIN_PROPERTY_EXCEPTIONS))
def test_train_workflow_properties(bundle, bundle_copy, tmp_path):
    """``create_workflow(workflow_type="train").check_properties()`` on each train config, with a phantom
    datalist: no required property missing, and only the documented optional differences."""
    from ctfm_bundles.tools.synthetic.phantom import make_dataset

    root = bundle_copy(bundle)
    data = tmp_path / "data"
    datalist = make_dataset(output_dir=str(data), num_cases=3, kind="head" if bundle == "ctfm_triage" else "body",
                            shape=(24, 24, 16), spacing=8.0)
    workflow = create_workflow(
        workflow_type="train", config_file=str(root / "configs/train.json"),
        meta_file=str(root / "configs/metadata.json"), logging_file=str(root / "configs/logging.conf"),
        bundle_root=str(root), init_filters=INIT_FILTERS, dataset_dir=str(data), datalist=datalist,
        output_dir=str(tmp_path / "out"), num_workers=0,
    )
    assert set(workflow.check_properties()) == TRAIN_PROPERTY_EXCEPTIONS[bundle]
    for reason in TRAIN_PROPERTY_EXCEPTIONS[bundle]:
        assert reason in (root / "docs/README.md").read_text(), f"{bundle} docs must say why {reason} differs"
