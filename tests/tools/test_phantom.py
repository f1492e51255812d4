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
"""Tests of tools/synthetic/phantom.py: the synthetic body and head CT phantoms."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO_ROOT

from ctfm_bundles.tools.synthetic import phantom

TOTALSEG_LABELS_JSON = REPO_ROOT.parent / "shared" / "data" / "totalseg_v2_labels.json"
BONES = ("vertebrae", "rib_left", "rib_right")


def _stats(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, registry=phantom.BODY_LABELS) -> dict:
    return phantom.label_statistics(image, labels, affine, registry=registry)


@pytest.fixture(scope="module")
def body() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return phantom.make_body_phantom(shape=(96, 96, 64), spacing=(3.0, 3.0, 3.0), seed=0)


def _assert_anatomical_order(centroids: dict[str, list[float]]) -> None:
    """RAS world: +x = patient's right, +y = anterior, +z = superior."""
    x = {name: c[0] for name, c in centroids.items()}
    y = {name: c[1] for name, c in centroids.items()}
    z = {name: c[2] for name, c in centroids.items()}
    assert x["liver"] > 0 > x["spleen"], "liver must be on the patient's right, spleen on the left"
    assert x["kidney_right"] > 0 > x["kidney_left"]
    assert x["lung_right"] > x["heart"] > x["lung_left"], "heart must lie between the lungs"
    assert x["rib_right"] > 0 > x["rib_left"]
    assert min(z["lung_left"], z["lung_right"]) > max(z["kidney_left"], z["kidney_right"]), "lungs above kidneys"
    assert z["lung_right"] > z["liver"] and z["lung_left"] > z["spleen"], "liver/spleen below the lungs"
    assert z["heart"] > z["liver"]
    assert y["vertebrae"] < y["heart"], "vertebrae must be posterior to the heart"
    assert y["vertebrae"] < y["aorta"] < y["heart"]
    assert max(y["kidney_left"], y["kidney_right"]) < y["liver"], "kidneys must be posterior"
    assert abs(x["vertebrae"]) < 5.0, "the spine is on the midline"


def test_written_nifti_keeps_geometry_and_is_ras(body, tmp_path):
    image, labels, affine = body
    written = phantom.save_phantom(image, labels, affine, image_path=tmp_path / "ct.nii.gz",
                                   label_path=tmp_path / "ct_labels.nii.gz")
    assert sorted(os.listdir(tmp_path)) == ["ct.nii.gz", "ct_labels.nii.gz"], "no temporary files left behind"
    ct, seg = nib.load(written["image"]), nib.load(written["label"])
    for nii in (ct, seg):
        assert nii.shape == (96, 96, 64)
        np.testing.assert_allclose(nii.affine, affine, atol=1e-5)
        assert nib.aff2axcodes(nii.affine) == ("R", "A", "S")
        assert nii.header.get_zooms() == (3.0, 3.0, 3.0)
        assert nii.header.get_xyzt_units()[0] == "mm"
        assert int(nii.header["qform_code"]) == 1 and int(nii.header["sform_code"]) == 1
    assert ct.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(ct.dataobj), image)
    np.testing.assert_array_equal(np.asanyarray(seg.dataobj), labels)
    # The volume centre is the world origin (a non-zero affine origin).
    centre = affine @ np.array([(n - 1) / 2.0 for n in image.shape] + [1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    assert np.all(affine[:3, 3] < 0)


def test_every_organ_present_with_typical_hu(body):
    image, labels, affine = body
    assert image.dtype == np.int16 and labels.dtype == np.uint8
    stats = _stats(image, labels, affine)
    noise = 15.0
    for name in phantom.BODY_LABELS:
        assert stats[name]["voxels"] > 0, f"{name} missing"
        typical, spread = phantom.BODY_HU[name]
        mean = stats[name]["mean_hu"]
        if name in BONES:
            assert 400 <= mean <= 1000, f"{name}: {mean:.0f} HU is not bone"
        else:
            assert abs(mean - typical) <= spread + 5.0, f"{name}: {mean:.0f} HU, expected about {typical:.0f}"
        assert abs(stats[name]["std_hu"] - noise) < 3.0, f"{name}: noise sigma should be about {noise} HU"
    air = image[labels == 0]
    assert air.size > 0 and abs(air.mean() + 1000) < 5, "the body must be surrounded by air"
    assert -900 < stats["lung_left"]["mean_hu"] < -800 and stats["fat"]["mean_hu"] < -80
    # The torso fills most of the field of view left-right.
    body_columns = np.flatnonzero((labels > 0).any(axis=(1, 2)))
    assert (body_columns[-1] - body_columns[0] + 1) >= 0.8 * image.shape[0]
    # The vertebral column runs along the whole length.
    assert (labels == phantom.BODY_LABELS["vertebrae"]).any(axis=(0, 1)).mean() > 0.6


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_anatomical_order_holds_for_every_seed(seed):
    image, labels, affine = phantom.make_body_phantom(shape=(64, 64, 48), spacing=(4.0, 4.0, 4.0), seed=seed)
    stats = _stats(image, labels, affine)
    _assert_anatomical_order({name: s["centroid_mm"] for name, s in stats.items()})


def test_same_seed_is_reproducible_and_seeds_differ():
    first = phantom.make_body_phantom(shape=(48, 48, 32), seed=7)
    again = phantom.make_body_phantom(shape=(48, 48, 32), seed=7)
    other = phantom.make_body_phantom(shape=(48, 48, 32), seed=8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], other[1]), "a different seed must move the organs, not only the noise"
    assert not np.array_equal(first[0], other[0])


def test_blur_softens_edges_without_moving_organ_hu():
    sharp = phantom.make_body_phantom(shape=(48, 48, 32), seed=2, noise_hu=0.0)
    blurred = phantom.make_body_phantom(shape=(48, 48, 32), seed=2, noise_hu=0.0, blur_mm=3.0)
    np.testing.assert_array_equal(sharp[1], blurred[1])
    assert blurred[0].dtype == np.int16
    assert len(np.unique(blurred[0])) > 10 * len(np.unique(sharp[0])), "edges must get intermediate HU values"
    liver = sharp[1] == phantom.BODY_LABELS["liver"]
    assert np.median(blurred[0][liver]) == pytest.approx(np.median(sharp[0][liver]), abs=5)


def test_very_anisotropic_spacing_keeps_every_organ():
    image, labels, affine = phantom.make_body_phantom(shape=(128, 128, 20), spacing=(0.8, 0.8, 5.0), seed=3)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(affine)[:3], (0.8, 0.8, 5.0))
    stats = _stats(image, labels, affine)
    missing = [name for name, s in stats.items() if s["voxels"] == 0]
    assert not missing, f"organs missing at 0.8 x 0.8 x 5 mm: {missing}"
    _assert_anatomical_order({name: s["centroid_mm"] for name, s in stats.items()})


def test_same_field_of_view_gives_same_anatomy_at_any_spacing():
    coarse = phantom.make_body_phantom(shape=(64, 64, 40), spacing=(4.5, 4.5, 6.0), seed=5, noise_hu=0)
    fine = phantom.make_body_phantom(shape=(96, 96, 80), spacing=(3.0, 3.0, 3.0), seed=5, noise_hu=0)
    coarse_stats, fine_stats = _stats(*coarse), _stats(*fine)
    for name in ("liver", "lung_left", "lung_right", "heart", "spleen", "kidney_left", "kidney_right"):
        volume_coarse = coarse_stats[name]["voxels"] * np.prod([4.5, 4.5, 6.0])
        volume_fine = fine_stats[name]["voxels"] * 27.0
        assert volume_coarse == pytest.approx(volume_fine, rel=0.2), name
        np.testing.assert_allclose(coarse_stats[name]["centroid_mm"], fine_stats[name]["centroid_mm"], atol=6.0)


def test_head_phantom_with_and_without_lesion():
    with_lesion = phantom.make_head_phantom(seed=4, lesion=True)
    without = phantom.make_head_phantom(seed=4, lesion=False)
    lesion = phantom.HEAD_LABELS["lesion"]
    stats = _stats(*with_lesion, registry=phantom.HEAD_LABELS)
    assert stats["lesion"]["voxels"] > 0
    expected_error = 3 * 10.0 / math.sqrt(stats["lesion"]["voxels"])
    assert abs(stats["lesion"]["mean_hu"] - 70.0) <= 5.0 + expected_error
    assert abs(stats["brain"]["mean_hu"] - 35.0) <= 4.0
    assert stats["skull"]["mean_hu"] > 850
    assert stats["lesion"]["mean_hu"] > stats["brain"]["mean_hu"] + 20, "the lesion must be hyperdense"
    assert not (without[1] == lesion).any()
    # A matched control: the lesion is the only difference in the label maps and the images.
    in_lesion = with_lesion[1] == lesion
    np.testing.assert_array_equal(np.where(in_lesion, phantom.HEAD_LABELS["brain"], with_lesion[1]), without[1])
    np.testing.assert_array_equal(with_lesion[0][~in_lesion], without[0][~in_lesion])
    assert with_lesion[0][in_lesion].mean() > without[0][in_lesion].mean() + 20
    # The lesion lies inside the brain: its voxels are all at least one voxel away from the skull.
    from scipy.ndimage import binary_dilation

    near_lesion = binary_dilation(with_lesion[1] == lesion)
    assert not (near_lesion & (with_lesion[1] == phantom.HEAD_LABELS["skull"])).any()
    # Seeds move the lesion.
    centroids = {tuple(np.round(_stats(*phantom.make_head_phantom(seed=s, lesion=True, noise_hu=0),
                                       registry=phantom.HEAD_LABELS)["lesion"]["centroid_mm"]))
                 for s in range(3)}
    assert len(centroids) == 3


def test_totalsegmentator_relabelling(body):
    _, labels, _ = body
    relabelled = phantom.to_totalseg_labels(labels, kind="body")
    assert relabelled.shape == labels.shape and relabelled.dtype == np.uint8 and relabelled.max() <= 117
    for name, value in phantom.BODY_LABELS.items():
        assert np.all(relabelled[labels == value] == phantom.TOTALSEG_INDEX.get(name, 0)), name
    assert not relabelled[labels == phantom.BODY_LABELS["fat"]].any()
    head_labels = phantom.make_head_phantom(seed=0, lesion=True)[1]
    head_relabelled = phantom.to_totalseg_labels(head_labels, kind="head")
    assert set(np.unique(head_relabelled).tolist()) == {0, 90, 91}  # background, brain, skull


def test_totalseg_index_matches_the_totalsegmentator_class_names():
    if not TOTALSEG_LABELS_JSON.exists():
        pytest.skip(f"{TOTALSEG_LABELS_JSON} not present (shared test data is only in CI)")
    names = json.loads(TOTALSEG_LABELS_JSON.read_text())["labels"]
    expected = {
        "spleen": "spleen", "kidney_right": "kidney_right", "kidney_left": "kidney_left", "liver": "liver",
        "lung_left": "lung_upper_lobe_left", "lung_right": "lung_upper_lobe_right", "vertebrae": "vertebrae_L1",
        "heart": "heart", "aorta": "aorta", "brain": "brain", "skull": "skull", "rib_left": "rib_left_5",
        "rib_right": "rib_right_5", "lesion": "brain",
    }
    assert {name: names[str(index)] for name, index in phantom.TOTALSEG_INDEX.items()} == expected


def test_label_statistics_equal_hand_computed_values():
    labels = np.zeros((4, 2, 2), dtype=np.uint8)
    labels[2:, 0, 0] = 1  # voxels (2,0,0) and (3,0,0)
    image = np.zeros(labels.shape, dtype=np.int16)
    image[2, 0, 0], image[3, 0, 0] = 10, 30
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-3.0, 5.0, 0.0)
    stats = phantom.label_statistics(image, labels, affine, registry={"thing": 1, "absent": 2})
    assert stats["thing"]["voxels"] == 2
    assert stats["thing"]["mean_hu"] == pytest.approx(20.0) and stats["thing"]["std_hu"] == pytest.approx(10.0)
    assert stats["thing"]["centroid_mm"] == pytest.approx([-3.0 + 2.0 * 2.5, 5.0, 0.0])
    assert stats["absent"]["voxels"] == 0 and math.isnan(stats["absent"]["mean_hu"])


def _resolve(root: Path, relative: str) -> Path:
    path = root / relative
    assert not Path(relative).is_absolute() and path.is_file(), f"{relative} does not resolve under {root}"
    return path


def test_make_dataset_body_writes_cases_and_datalist(tmp_path):
    datalist_path = phantom.make_dataset(output_dir=str(tmp_path / "body"), num_cases=3, kind="body", seed=1,
                                         shape=(32, 32, 24), spacing=(6.0, 6.0, 8.0))
    root = tmp_path / "body"
    datalist = json.loads(Path(datalist_path).read_text())
    items = datalist["training"] + datalist["validation"]
    assert len(items) == 3 and datalist["validation"] and datalist["numTraining"] == len(datalist["training"])
    images = []
    for item in items:
        ct, seg = nib.load(_resolve(root, item["image"])), nib.load(_resolve(root, item["label"]))
        assert ct.shape == seg.shape == (32, 32, 24)
        np.testing.assert_allclose(ct.affine, seg.affine)
        assert set(np.unique(np.asanyarray(seg.dataobj)).tolist()) == {0, *phantom.BODY_LABELS.values()}
        images.append(np.asanyarray(ct.dataobj))
    assert not np.array_equal(images[0], images[1]), "cases must differ"
    assert not any(name.startswith(".") for name in os.listdir(root / "imagesTr"))


def test_make_dataset_head_has_lesion_flags_and_masks(tmp_path):
    datalist_path = phantom.make_dataset(output_dir=str(tmp_path), num_cases=4, kind="head", seed=2,
                                         shape=(32, 32, 20), lesion_fraction=0.5)
    datalist = json.loads(Path(datalist_path).read_text())
    items = datalist["training"] + datalist["validation"]
    assert sorted(item["label"] for item in items) == [0, 0, 1, 1]
    assert {item["label"] for item in datalist["validation"]} <= {0, 1} and datalist["training"]
    for item in items:
        assert isinstance(item["label"], int)
        mask = np.asanyarray(nib.load(_resolve(tmp_path, item["lesion_mask"])).dataobj)
        _resolve(tmp_path, item["image"])
        assert set(np.unique(mask).tolist()) <= {0, 1}
        assert bool(mask.any()) == bool(item["label"]), "lesion mask must match the lesion flag"


def test_cli_writes_a_body_phantom(tmp_path):
    output = tmp_path / "cli" / "ct.nii.gz"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("ctfm-phantom")), "body", "--output", str(output),
         "--shape", "32,32,24", "--spacing", "2,2,4", "--seed", "3"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    ct = nib.load(output)
    seg = nib.load(tmp_path / "cli" / "ct_labels.nii.gz")
    assert ct.shape == seg.shape == (32, 32, 24) and ct.header.get_zooms() == (2.0, 2.0, 4.0)
    np.testing.assert_array_equal(np.asanyarray(ct.dataobj),
                                  phantom.make_body_phantom(shape=(32, 32, 24), spacing=(2, 2, 4), seed=3)[0])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: phantom.make_body_phantom(shape=(96, 96)), "shape must be 3"),
        (lambda: phantom.make_body_phantom(shape=(8, 96, 64)), "shape must be 3 integers >= 16"),
        (lambda: phantom.make_body_phantom(spacing=(-1.0, 1.0, 1.0)), "spacing must be 3 positive"),
        (lambda: phantom.make_body_phantom(spacing=(1.0, 1.0)), "spacing must be 3"),
        (lambda: phantom.make_head_phantom(noise_hu=-1.0), "noise_hu must be"),
        (lambda: phantom.make_body_phantom(seed=-1), "seed must be"),
        (lambda: phantom.make_body_phantom(shape=(20, 96, 64), spacing=(0.5, 5.0, 3.0)), "voxels along j"),
        (lambda: phantom.to_totalseg_labels(np.zeros((2, 2, 2)), kind="legs"), "kind must be one of"),
        (lambda: phantom.make_dataset(output_dir="unused", num_cases=0), "num_cases must be"),
        (lambda: phantom.write_phantom(output="unused.nii.gz", kind="body", lesion=True), "only available for head"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_body_phantom_is_fast():
    phantom.make_body_phantom()  # warm up imports and caches
    start = time.perf_counter()
    phantom.make_body_phantom(shape=(96, 96, 64), spacing=(3.0, 3.0, 3.0), seed=1)
    assert time.perf_counter() - start < 1.0, "a 96 x 96 x 64 phantom must take well under a second"
