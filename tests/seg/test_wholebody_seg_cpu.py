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
"""ctfm_wholebody_seg on the CPU: the slab-by-slab argmax gives MONAI's label map.

``scripts.sliding.SlabArgmaxInferer`` (the bundle's CPU default, ``slab_argmax``) must give
the label map that MONAI's ``SlidingWindowInferer`` + argmax gives with the same windows and
weights: checked directly on tensors (window grids with padding, several overlaps and batch
sizes) and end to end through configs/inference.json on a phantom against the torch path
(``slab_argmax`` false, float32 stitching).
"""

from __future__ import annotations

import importlib
import importlib.util
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES_DIR, run_bundle

from ctfm_bundles.tools import bundle_scripts_switch
from ctfm_bundles.tools.synthetic import phantom

BUNDLE = "ctfm_wholebody_seg"


@pytest.fixture
def scripts():
    """The bundle's ``scripts`` package with ``sliding`` and ``segment`` (the import is undone after)."""
    with bundle_scripts_switch() as use:
        use(BUNDLES_DIR / BUNDLE)
        for module in ("sliding", "segment"):
            importlib.import_module(f"scripts.{module}")
        yield importlib.import_module("scripts")


def _tiny_network(num_classes: int = 6):
    """Cheap stand-in for the network: the stitching does not depend on what makes the logits."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(8, num_classes, 1)).eval()


@pytest.mark.parametrize("shape, overlap, sw_batch_size", [
    ((70, 45, 61), 0.25, 2),  # 3 x 2 x 2 windows, a batch that spans two slabs
    ((20, 40, 33), 0.5, 3),  # smaller than the window along the first axis: padded, then cropped
    ((50, 36, 40), (0.6, 0.25, 0.0), 1),  # one overlap per axis
])
def test_slab_argmax_equals_monai_sliding_window_then_argmax(scripts, shape, overlap, sw_batch_size):
    from monai.data import MetaTensor
    from monai.inferers import SlidingWindowInferer

    sliding = scripts.sliding
    network = _tiny_network()
    torch.manual_seed(1)
    affine = torch.diag(torch.tensor([1.5, 1.5, 1.5, 1.0]))
    image = MetaTensor(torch.rand(1, 1, *shape), affine=affine)
    settings = {"roi_size": (32, 32, 32), "sw_batch_size": sw_batch_size, "overlap": overlap, "mode": "gaussian"}
    with torch.inference_mode():
        expected = SlidingWindowInferer(**settings)(image, network).argmax(1, keepdim=True)
        inferer = sliding.SlabArgmaxInferer(**settings)
        labels = inferer(image, network)
        logits = sliding.SlabArgmaxInferer(**settings, argmax=False)(image, network)
    assert labels.shape == (1, 1, *shape) and labels.dtype == torch.float32
    assert torch.equal(labels.as_tensor().long(), expected.as_tensor()), "label maps differ"
    assert isinstance(labels, MetaTensor) and torch.equal(labels.affine, affine.to(labels.affine.dtype))
    assert logits.shape == (1, 6, *shape)  # argmax false: MONAI's logits unchanged
    assert set(inferer.timings) == {"network_s", "stitch_s"}



def _segresnet(num_classes: int = 24, init_filters: int = 8):
    from monai.networks.nets import SegResNetDS

    torch.manual_seed(0)
    return SegResNetDS(spatial_dims=3, in_channels=1, out_channels=num_classes, init_filters=init_filters,
                       blocks_down=[1, 2, 2, 4, 4], dsdepth=4).eval()


def _phantom_tensor(shape, spacing=3.0):
    ct, _, _ = phantom.make_body_phantom(shape=shape, spacing=spacing, seed=3)
    return torch.as_tensor(np.clip((ct.astype(np.float32) + 1024) / 2048, 0, 1))[None, None]


def test_feature_stitching_gives_monai_label_map_and_leaves_the_network_whole(scripts):
    """SegResNetDS's head is linear: stitching its features and running the head on their weighted mean
    is MONAI's mean of the windows' logits, so the label map is MONAI's (float32 throughout)."""
    from monai.inferers import SlidingWindowInferer

    sliding = scripts.sliding
    network = _segresnet()
    image = _phantom_tensor(shape=(48, 40, 56))
    settings = {"roi_size": (32, 32, 32), "sw_batch_size": 2, "overlap": 0.25, "mode": "gaussian"}
    head = network.up_layers[-1]["head"]
    with torch.inference_mode():
        expected = SlidingWindowInferer(**settings)(image, network).argmax(1, keepdim=True)
        features = sliding.SlabArgmaxInferer(**settings)(image, network)
        logits = sliding.SlabArgmaxInferer(**settings, stitch_features=False)(image, network)
        after = network(image[..., :32, :32, :32])
    assert sliding.split_head(network) is not None and sliding.split_head(_tiny_network()) is None
    assert len(torch.unique(expected)) > 3  # random weights: many labels, many near-ties
    assert float((features.long() == expected).float().mean()) > 0.9999
    assert torch.equal(logits.long(), expected)
    # the heads are back: same module, full logits again
    assert network.up_layers[-1]["head"] is head and after.shape[1] == 24


def test_bf16_with_float32_stem_and_head_keeps_float32_label_map(scripts):
    """Under bf16 autocast, rounding the [0, 1] input, the head's weights and the logits to bf16 flips the
    argmax of near-tied logits (random weights); the float32 stem and the float32 head on stitched
    features keep float32's label map."""
    from monai.inferers import SlidingWindowInferer

    sliding = scripts.sliding
    network = _segresnet(num_classes=118, init_filters=8)
    image = _phantom_tensor(shape=(48, 40, 56))
    settings = {"roi_size": (32, 32, 32), "sw_batch_size": 1, "overlap": 0.25, "mode": "gaussian"}
    with torch.inference_mode():
        expected = SlidingWindowInferer(**settings)(image, network).argmax(1, keepdim=True)
        network.to(memory_format=torch.channels_last_3d)
        agree = {}
        for name, stem, features in (("all bf16", False, False), ("float32 stem and head", True, True)):
            model = scripts.segment.CastOutput(network, None, 1, True, lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                                       float32_stem=stem)
            labels = sliding.SlabArgmaxInferer(**settings, stitch_features=features)(image, model)
            agree[name] = float((labels.long() == expected).float().mean())
    assert agree["float32 stem and head"] >= 0.995, agree
    assert agree["float32 stem and head"] > agree["all bf16"] + 0.01, agree
    assert isinstance(network.encoder.conv_init, torch.nn.Conv3d)  # the stem is the network's own again


def test_stitching_switches_take_words_from_the_command_line(scripts):
    """``--slab_argmax false --stitch_features false`` arrive as words: both switch off (a word is not a
    true bool), the postprocessing's argmax switches on, and a word that is no boolean is refused."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / BUNDLE / "configs" / "inference.json"))
    parser.update({"slab_argmax": "false", "stitch_features": "false", "device": "cpu"})
    inferer = parser.get_parsed_content("window_inferer")
    assert inferer.argmax is False and inferer.stitch_features is False
    argmax_step = [t for t in parser.get_parsed_content("postprocessing").transforms if type(t).__name__ == "AsDiscreted"]
    assert argmax_step and argmax_step[0].argmax[0] is True
    with pytest.raises(ValueError, match="maybe"):
        scripts.sliding.SlabArgmaxInferer(roi_size=(16, 16, 16), stitch_features="maybe")

def test_inference_config_cpu_label_map_matches_the_torch_path_on_a_phantom(tmp_path):
    from monai.networks.nets import SegResNetDS

    ct, labels, affine = phantom.make_body_phantom(shape=(36, 32, 24), spacing=(6.0, 6.0, 6.0), seed=2)
    image = tmp_path / "ct.nii.gz"
    phantom.save_phantom(ct, labels, affine, image_path=str(image), label_path=str(tmp_path / "labels.nii.gz"))
    torch.manual_seed(0)
    weights = tmp_path / "weights.pt"
    torch.save(SegResNetDS(spatial_dims=3, in_channels=1, out_channels=118, init_filters=8, blocks_down=[1, 2, 2, 4, 4],
                           dsdepth=4).state_dict(), weights)
    common = {"input": str(image), "ckpt": str(weights), "init_filters": 8, "spacing": [6.0, 6.0, 6.0],
              "patch_size": [16, 32, 32], "overlap": 0.25, "sw_batch_size": 2, "device": "cpu", "amp": False,
              "save_csv": False, "save_preview": False}
    maps = {}
    for name, options in {"slab": {}, "torch": {"slab_argmax": False, "stitch_dtype": "float32"}}.items():
        out = tmp_path / name
        run_bundle(BUNDLE, "inference.json", output_dir=str(out), **common, **options)
        seg = nib.load(out / "ct" / "ct_seg.nii.gz")
        assert seg.shape == ct.shape and np.allclose(seg.affine, affine, atol=1e-4)
        maps[name] = np.asarray(seg.dataobj)
        stages = json.loads((out / "summary.json").read_text())["cases"][0]["stages"]
        assert ("infer_network_s" in stages) == (name == "slab")
    assert len(np.unique(maps["torch"])) > 2  # random weights still give several labels
    np.testing.assert_array_equal(maps["slab"], maps["torch"])
