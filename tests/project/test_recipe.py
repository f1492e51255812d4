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
"""The CT-FM recipe, value for value: each bundle's "Reference vs ours" table, checked on resolved objects.

Every config is built with MONAI's ``ConfigParser`` as ``monai.bundle run`` builds it (override files
merged after their base), and each row of the docs' recipe tables is asserted on the resolved
transforms, loss, optimizer, scheduler, view augmenter and windows, with the reference value as it
stands in project-lighter/CT-FM (f58c89a; file named per row). A justified deviation is checked
twice: ours as the default, the reference value after its documented override.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import BUNDLES_DIR
from monai.bundle import ConfigParser

from ctfm_bundles.tools import bundle_scripts_switch, use_bundle_scripts
from ctfm_bundles.tools.release import package_bundles as pb

HU_MIN, HU_MAX = -1024, 2048


@pytest.fixture
def parse():
    """``parse(bundle, *config_names, **overrides)``: the merged configs, parsed with the bundle's ``scripts``."""

    def _parse(bundle: str, *names: str, **overrides) -> ConfigParser:
        use_bundle_scripts(BUNDLES_DIR / bundle)
        parser = ConfigParser()
        parser.read_config([str(BUNDLES_DIR / bundle / "configs" / n) for n in names])
        parser.update({"init_filters": 8, **overrides})
        parser.parse()
        return parser

    with bundle_scripts_switch():
        yield _parse


def transforms_of(value) -> list:
    return list(value.transforms) if hasattr(value, "transforms") else list(value)


def names(transforms) -> list[str]:
    return [type(t).__name__ for t in transforms]


def one(transforms, cls_name: str):
    found = [t for t in transforms if type(t).__name__ == cls_name]
    assert len(found) == 1, f"expected one {cls_name} in {names(transforms)}"
    return found[0]


def keeps_only_positive(select_fn) -> bool:
    """``select_fn`` is CT-FM's CropForeground default (x > 0) on the values it sees."""
    return select_fn(torch.tensor([-1.0, 0.0, 1e-3])).tolist() == [False, False, True]


def check_image_recipe(transforms, *, spacing, crop_before_scaling: bool) -> None:
    """SPL, spacing, HU [-1024, 2048] -> [0, 1], CropForeground on HU > 0 right after spacing."""
    order = names(transforms)
    assert one(transforms, "Orientationd").ornt_transform.axcodes == "SPL"
    assert one(transforms, "Spacingd").spacing_transform.pixdim.tolist() == list(spacing)
    scaler = one(transforms, "ScaleIntensityRanged").scaler
    assert (scaler.a_min, scaler.a_max, scaler.b_min, scaler.b_max, scaler.clip) == (HU_MIN, HU_MAX, 0.0, 1.0, True)
    crop = one(transforms, "CropForegroundd")
    assert keeps_only_positive(crop.cropper.select_fn)
    if crop_before_scaling:  # on HU: x > 0 HU
        assert order.index("Spacingd") + 1 == order.index("CropForegroundd") < order.index("ScaleIntensityRanged")
    else:  # on [0, 1]: x > 0 means above -1024 HU, as in totalseg.yaml
        assert order.index("ScaleIntensityRanged") < order.index("CropForegroundd")


# ------------------------------------------------------------------------------------------------
# ctfm_pretrain (experiments/fm/frameworks/intrasample_simclr.yaml, experiments/fm/base.yaml,
# transforms/ssl.py, loss/intrasample_ntxent_loss.py)
# ------------------------------------------------------------------------------------------------


def test_pretrain_recipe(parse, tmp_path):
    p = parse("ctfm_pretrain", "train.json", output_dir=str(tmp_path), ckpt_dir=str(tmp_path))
    pre = transforms_of(p.get_parsed_content("train#preprocessing"))
    # Orientation SPL -> Spacing 3x1x1 -> CropForeground (default select_fn on HU) -> SpatialPad -1024
    assert names(pre)[-4:] == ["Orientationd", "Spacingd", "CropForegroundd", "SpatialPadd"]
    assert one(pre, "Orientationd").ornt_transform.axcodes == "SPL"
    assert one(pre, "Spacingd").spacing_transform.pixdim.tolist() == [3.0, 1.0, 1.0]
    assert keeps_only_positive(one(pre, "CropForegroundd").cropper.select_fn)
    assert one(pre, "SpatialPadd").padder.kwargs["value"] == HU_MIN
    batch = p.get_parsed_content("train#prepare_batch")
    assert (batch.a_min, batch.a_max) == (HU_MIN, HU_MAX)
    assert p.get_parsed_content("patch_size") == [32, 128, 128] and p.get_parsed_content("num_crops") == 15
    views = p.get_parsed_content("train#augmenter")
    assert views.num_views == 2 and views.crop_scale == (0.33, 1.0)  # s per axis: tests/pretrain/test_pretrain.py
    assert (views.flip_prob, views.num_control_points, views.histogram_shift_prob) == (0.5, 5, 0.5)
    assert (views.smooth_prob, views.smooth_sigma) == (0.5, (0.25, 1.5))  # RandGaussianSmoothd defaults
    loss = p.get_parsed_content("loss")
    assert (loss.temperature, loss.intra_sample, loss.symmetric) == (0.1, True, False)  # view 0 anchors only
    head = p.get_parsed_content("network_def").head
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Linear"]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (8 * 16, 256, 128)
    opt = p.get_parsed_content("optimizer")
    assert type(opt).__name__ == "AdamW"
    assert (opt.defaults["lr"], opt.defaults["weight_decay"]) == (1e-4, 1e-6)
    sched = p.get_parsed_content("lr_scheduler")
    assert type(sched).__name__ == "WarmupCosineSchedule"
    assert (sched.warmup_steps, sched.t_total) == (10 * 500, 500 * 500)  # 10 of 500 epochs x 500 batches
    assert p.get_parsed_content("batch_size") == 4
    # the symmetric SimCLR form stays one override away
    assert parse("ctfm_pretrain", "train.json", symmetric_loss=True).get_parsed_content("loss").symmetric


# ------------------------------------------------------------------------------------------------
# ctfm_wholebody_seg (evaluation/totalseg.yaml)
# ------------------------------------------------------------------------------------------------


def test_wholebody_seg_recipe(parse, tmp_path):
    p = parse("ctfm_wholebody_seg", "train.json", output_dir=str(tmp_path), ckpt_dir=str(tmp_path))
    pre = p.get_parsed_content("train#preprocessing")
    check_image_recipe(pre, spacing=[1.5, 1.5, 1.5], crop_before_scaling=False)
    assert one(pre, "CropForegroundd").cropper.margin == 10
    aug = p.get_parsed_content("train#augmentation")
    assert names(aug) == ["RandCropByLabelClassesd", "RandAffined", "RandGaussianSmoothd", "RandScaleIntensityd",
                          "RandShiftIntensityd", "RandGaussianNoised"]
    crop = one(aug, "RandCropByLabelClassesd").cropper
    assert crop.spatial_size == [96, 160, 160] and list(crop.ratios) == [0] + [1] * 117
    affine = one(aug, "RandAffined")
    grid = affine.rand_affine.rand_affine_grid
    assert (affine.prob, grid.rotate_range, grid.scale_range) == (0.2, (0.26,) * 3, (0.2,) * 3)
    smooth = one(aug, "RandGaussianSmoothd")
    assert smooth.prob == 0.2 and list(smooth.rand_smooth.sigma_x) == [0.5, 1.0]
    scale = one(aug, "RandScaleIntensityd")
    assert (scale.prob, scale.scaler.factors) == (0.5, (-0.3, 0.3))
    shift = one(aug, "RandShiftIntensityd")
    assert (shift.prob, shift.shifter.offsets) == (0.5, (-0.1, 0.1))
    noise = one(aug, "RandGaussianNoised")
    assert (noise.prob, noise.rand_gaussian_noise.std) == (0.2, 0.1)
    loss = p.get_parsed_content("loss")
    assert type(loss).__name__ == "DeepSupervisionLoss" and loss.weight_mode == "exp"
    dice = loss.loss.dice
    assert (dice.squared_pred, dice.smooth_nr, dice.smooth_dr, dice.include_background) == (True, 0.0, 1e-5, True)
    assert (dice.softmax, dice.to_onehot_y) == (True, True)
    opt = p.get_parsed_content("optimizer")
    assert type(opt).__name__ == "AdamW" and (opt.defaults["lr"], opt.defaults["weight_decay"]) == (2e-4, 1e-5)
    sched = p.get_parsed_content("lr_scheduler")
    assert type(sched).__name__ == "WarmupCosineSchedule"
    assert (sched.warmup_steps, sched.t_total, sched.warmup_multiplier) == (3, 300, 0.1)  # max_epochs / 100
    assert sched.end_lr == pytest.approx(2e-6)  # 1 % of the LR
    rates = []
    for _ in range(300):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == pytest.approx(2e-5)  # warmup from 10 % of the rate
    assert max(rates) == pytest.approx(2e-4, rel=1e-3) and rates.index(max(rates)) == 3
    assert min(rates[3:]) == pytest.approx(2e-6)
    net = p.get_parsed_content("network_def")
    assert (net.dsdepth, list(net.encoder.blocks_down)) == (4, [1, 2, 2, 4, 4])
    assert (p.get_parsed_content("batch_size"), p.get_parsed_content("max_epochs")) == (2, 300)
    # validation sliding window: ours 0.25 during training (speed), the reference's 0.625 one override away
    assert p.get_parsed_content("validate#inferer").overlap == 0.25
    evaluate = parse("ctfm_wholebody_seg", "train.json", "evaluate.json")
    assert evaluate.get_parsed_content("validate#inferer").overlap == 0.625
    check_image_recipe(evaluate.get_parsed_content("validate#preprocessing"), spacing=[1.5] * 3,
                       crop_before_scaling=False)
    # inference.json stands alone (the zoo and MONAI Label run it alone): the same image recipe
    inference = parse("ctfm_wholebody_seg", "inference.json")
    infer_pre = transforms_of(inference.get_parsed_content("preprocessing"))
    check_image_recipe(infer_pre, spacing=[1.5] * 3, crop_before_scaling=False)
    assert one(infer_pre, "CropForegroundd").cropper.margin == 10
    window = (inference.get_parsed_content("patch_size"), inference.get_parsed_content("overlap"))
    assert window == ([96, 160, 160], 0.625)


# ------------------------------------------------------------------------------------------------
# ctfm_triage (evaluation/sinoct.yaml)
# ------------------------------------------------------------------------------------------------

TRIAGE_ORDER = ["Orientationd", "CropForegroundd", "Spacingd", "SpatialPadd", "CenterSpatialCropd", "HUWindowsd"]


def triage_image_steps(transforms) -> list:
    return [t for t in transforms if type(t).__name__ in TRIAGE_ORDER]


def test_triage_recipe(parse, tmp_path):
    p = parse("ctfm_triage", "train.json", output_dir=str(tmp_path), ckpt_dir=str(tmp_path))
    pre = p.get_parsed_content("preprocessing")
    steps = triage_image_steps(pre)
    assert names(steps) == TRIAGE_ORDER
    assert one(pre, "Orientationd").ornt_transform.axcodes == "SPL"
    assert keeps_only_positive(one(pre, "CropForegroundd").cropper.select_fn)  # on HU, before spacing
    assert one(pre, "Spacingd").spacing_transform.pixdim.tolist() == [5.0, 2.0, 2.0]
    pad = one(pre, "SpatialPadd")
    assert pad.padder.spatial_size == [48, 128, 128] and pad.mode == ("minimum",)
    assert one(pre, "CenterSpatialCropd").cropper.roi_size == [48, 128, 128]
    aug = p.get_parsed_content("train#augmentation")
    affine = one(aug, "RandAffined")
    grid = affine.rand_affine.rand_affine_grid
    assert (affine.prob, grid.rotate_range, grid.scale_range) == (0.2, (0.26,) * 3, (0.2,) * 3)
    assert one(aug, "RandFlipd").prob == 0.0  # the reference has no flip
    opt = p.get_parsed_content("optimizer")
    assert type(opt).__name__ == "AdamW" and (opt.defaults["lr"], opt.defaults["weight_decay"]) == (1e-4, 1e-5)
    sched = p.get_parsed_content("lr_scheduler")
    assert type(sched).__name__ == "WarmupCosineSchedule"
    assert (sched.warmup_steps, sched.t_total, sched.end_lr) == (0, 40, pytest.approx(1e-6))
    assert p["loss"].startswith("$torch.nn.BCEWithLogitsLoss(pos_weight=")  # (pos_weight None unless set)
    assert p["pos_weight"] is None
    head = p.get_parsed_content("network_def").head
    assert (head[0].out_features, type(head[1]).__name__, head[2].out_features) == (256, "ReLU", 1)
    assert (p.get_parsed_content("batch_size"), p.get_parsed_content("max_epochs")) == (16, 40)
    # CT-FM's named windows ([low, high] HU: ScaleIntensityRanged a_min / a_max)
    windows = sys.modules["scripts.windows"]
    assert {n: windows.HU_WINDOWS[n] for n in windows.REFERENCE_WINDOWS} == {
        "blood": (0, 80), "subdural": (-125, 175), "stroke": (28, 36), "bone": (-900, 2100)}
    # the reference's stacking (ConcatItemsd dim=1: the four windows one after the other along S)
    reference = parse("ctfm_triage", "train.json", windows=list(windows.REFERENCE_WINDOWS), window_dim=1)
    assert reference.get_parsed_content("in_channels") == 1
    stack = one(reference.get_parsed_content("preprocessing"), "HUWindowsd")
    hu = torch.tensor([-1000.0, 0.0, 32.0, 100.0, 1000.0]).reshape(1, 5, 1, 1)
    stacked = stack({"image": hu})["image"]
    assert stacked.shape == (1, 20, 1, 1)
    expected = torch.cat([((hu - lo) / (hi - lo)).clamp(0, 1)
                          for lo, hi in (windows.HU_WINDOWS[n] for n in windows.REFERENCE_WINDOWS)], dim=1)
    assert torch.allclose(stacked, expected)
    # inference.json stands alone: the same image steps, argument for argument
    inference = parse("ctfm_triage", "inference.json")
    ours = triage_image_steps(inference.get_parsed_content("preprocessing").transforms)
    assert names(ours) == TRIAGE_ORDER and one(ours, "SpatialPadd").mode == ("minimum",)
    assert one(ours, "Orientationd").ornt_transform.axcodes == "SPL"
    train_windows = [(w.a_min, w.a_max) for w in one(pre, "HUWindowsd").scalers]
    assert [(w.a_min, w.a_max) for w in one(ours, "HUWindowsd").scalers] == train_windows
    assert one(ours, "Spacingd").spacing_transform.pixdim.tolist() == [5.0, 2.0, 2.0]
    assert one(ours, "CenterSpatialCropd").cropper.roi_size == [48, 128, 128]
    assert keeps_only_positive(one(ours, "CropForegroundd").cropper.select_fn)


# ------------------------------------------------------------------------------------------------
# ctfm_retrieval (scripts/3d_mir_generate_embeddings.py, generate_saliency_maps.py,
# semantic_search_quantitative.py)
# ------------------------------------------------------------------------------------------------

RETRIEVAL = {  # config -> spacing (ours)
    "embed.json": [3.0, 1.0, 1.0],
    "query.json": [3.0, 1.0, 1.0],
    "robustness.json": [3.0, 1.0, 1.0],
    "saliency.json": [3.0, 3.0, 3.0],
    "semantic_search.json": [3.0, 1.0, 1.0],
}


@pytest.mark.parametrize("config", list(RETRIEVAL))
def test_retrieval_configs_share_one_checked_preprocessing(parse, config):
    files = next(f for f in pb.config_sets(BUNDLES_DIR / "ctfm_retrieval") if f[-1] == f"configs/{config}")
    p = parse("ctfm_retrieval", *[f.split("/", 1)[1] for f in files])
    pre = transforms_of(p.get_parsed_content("preprocessing"))
    # the input checks first, as in embed.json, then the CT-FM image recipe with CropForeground after spacing
    assert names(pre)[:4] == ["CheckInputd", "LoadImaged", "EnsureChannelFirstd", "CheckVolumed"]
    check_image_recipe(pre, spacing=RETRIEVAL[config], crop_before_scaling=True)
    pad = pre[names(pre).index("ScaleIntensityRanged") + 1]
    assert type(pad).__name__ == ("SpatialPadd" if config in ("embed.json", "query.json", "robustness.json")
                                  else "DivisiblePadd")
    if config != "embed.json":  # an override of embed.json, which holds the one definition
        own = ConfigParser.load_config_file(str(BUNDLES_DIR / "ctfm_retrieval" / "configs" / config))
        assert "preprocessing" not in own and files[0] == "configs/embed.json"


def test_retrieval_recipe(parse):
    embed = parse("ctfm_retrieval", "embed.json")
    embedder = embed.get_parsed_content("embedder")
    assert (list(embedder.patch_size), embedder.overlap, embedder.aggregation) == ([24, 128, 128], 0.625, "min")
    saliency = parse("ctfm_retrieval", "embed.json", "saliency.json")
    assert (saliency["mask_size"], saliency["overlap"], saliency["occlusion_mode"]) == (10, 0.25, "gaussian")
    assert saliency["saliency"]["mode"] == "@occlusion_mode"
    search = parse("ctfm_retrieval", "embed.json", "semantic_search.json")
    assert search["ras_voxel_order"] is False and search["search"]["ras_voxel_order"] == "@ras_voxel_order"


def test_semantic_search_ras_voxel_order_is_the_reference_permutation():
    """``ras_voxel_order``: the encoder sees ``x.permute(0, 1, 4, 3, 2).flip(2).flip(3)`` (lines 88-89 of the
    reference) and the features come back on the SPL grid."""
    import importlib

    with bundle_scripts_switch() as use:
        use(BUNDLES_DIR / "ctfm_retrieval")
        module = importlib.import_module("scripts.semantic_search")
    seen = []

    class Probe(torch.nn.Module):  # records its input; "features": the input itself at stride 1
        def forward(self, x):
            seen.append(x.clone())
            return [x.repeat(1, 2, 1, 1, 1)]

    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)  # (C, S, P, L)
    back = module._features(Probe(), image, -1, torch.device("cpu"), False, ras_voxel_order=True)
    assert torch.equal(seen[0], image[None].permute(0, 1, 4, 3, 2).flip(2).flip(3))  # (1, 1, L->R, P->A, S)
    assert torch.equal(back, image.repeat(2, 1, 1, 1))  # back in SPL order
