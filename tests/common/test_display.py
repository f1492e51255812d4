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
"""One display convention for every PNG (``ctfm_common/display.py``): RAS for display, anterior and
head up, the patient's right on the viewer's left, anatomical axis labels, the point marked.

An LPS and an RAS copy of the same phantom must give the same panels, in the helper and in the
PNG files the segmentation and retrieval bundles write.
"""

from __future__ import annotations

import importlib
import re
import sys

import numpy as np
import pytest
from conftest import BUNDLES_DIR, REPO_ROOT
from matplotlib.image import imread
from ctfm_bundles.tools import bundle_scripts_switch, use_bundle_scripts
from ctfm_bundles.tools.synthetic.phantom import BODY_LABELS, make_body_phantom

from ctfm_common import display


@pytest.fixture(scope="module")
def phantom():
    image, labels, affine = make_body_phantom(shape=(40, 36, 24), spacing=(2.0, 2.5, 4.0), noise_hu=0.0)
    return image.astype(np.float32), labels, affine


def lps_copy(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same scan stored LPS (as DICOM): i and j flipped, world coordinates unchanged."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = array.shape[0] - 1, array.shape[1] - 1
    return array[::-1, ::-1].copy(), affine @ flip


def test_lps_and_ras_copies_give_the_same_panels(phantom):
    image, labels, affine = phantom
    lps_image, lps_affine = lps_copy(image, affine)
    lps_labels, _ = lps_copy(labels, affine)
    point = np.array([25, 10, 12])
    lps_point = np.array([image.shape[0] - 1 - 25, image.shape[1] - 1 - 10, 12])
    ras_views = display.orthogonal_views([image, labels], affine, point)
    lps_views = display.orthogonal_views([lps_image, lps_labels], lps_affine, lps_point)
    for ras, lps in zip(ras_views, lps_views):
        assert ras.name == lps.name and ras.aspect == lps.aspect and ras.point == lps.point
        for a, b in zip(ras.slices, lps.slices):
            np.testing.assert_array_equal(a, b)


def test_panels_follow_the_radiological_convention(phantom):
    image, labels, affine = phantom
    liver = np.argwhere(labels == BODY_LABELS["liver"]).mean(0)
    axial, coronal, sagittal = display.orthogonal_views([image, labels], affine, liver)
    # axial: the liver (patient's right) on the viewer's left; the spine (posterior) at the bottom
    cols = np.argwhere(axial.slices[1] == BODY_LABELS["liver"])[:, 1]
    assert cols.mean() < axial.slices[1].shape[1] / 2
    spine = np.argwhere(np.isin(axial.slices[1], [BODY_LABELS[k] for k in BODY_LABELS if "vertebra" in k or k == "spine"]))
    assert len(spine) and spine[:, 0].mean() > axial.slices[1].shape[0] / 2
    # coronal / sagittal: head up (the lungs are superior to the kidneys)
    for view in (coronal,):
        lungs = np.argwhere(np.isin(view.slices[1], [BODY_LABELS["lung_left"], BODY_LABELS["lung_right"]]))
        liver_rows = np.argwhere(view.slices[1] == BODY_LABELS["liver"])
        assert lungs[:, 0].mean() < liver_rows[:, 0].mean()
    # physical aspect ratio: rows of the axial panel are A (2.5 mm), columns R (2 mm)
    assert axial.aspect == pytest.approx(2.5 / 2.0) and coronal.aspect == pytest.approx(4.0 / 2.0)
    # the marked point is the liver centre on every panel
    assert axial.slices[1][int(round(axial.point[1])), int(round(axial.point[0]))] == BODY_LABELS["liver"]
    assert display.axis_labels(axial) == ("right \u2190 \u2192 left", "posterior \u2190 \u2192 anterior")
    assert display.axis_labels(sagittal) == ("anterior \u2190 \u2192 posterior", "inferior \u2190 \u2192 superior")


def test_readable_numbers_and_fitted_colour_scale():
    assert display.readable(3.2e-5) == "3.200e-05"
    assert display.readable(0.01234) == "0.01234"
    assert display.readable(0.0) == "0"
    values = np.r_[np.linspace(0.0, 0.02, 999), 5.0]  # one outlier does not flatten the scale
    low, high = display.value_range(values)
    assert low == pytest.approx(0.0, abs=1e-3) and high < 0.1
    assert display.value_range(np.ones(5)) [0] < 1.0 < display.value_range(np.ones(5))[1]


def bundle_scripts(bundle: str):
    """Import a bundle's ``scripts`` package (two bundles never at once; the test takes ``restore_path``)."""
    use_bundle_scripts(BUNDLES_DIR / bundle)
    return importlib.import_module("scripts")


@pytest.fixture
def restore_path():
    with bundle_scripts_switch():
        yield


def test_every_png_writer_gives_the_same_picture_for_lps_and_ras(phantom, tmp_path, restore_path):
    image, labels, affine = phantom
    lps_image, lps_affine = lps_copy(image, affine)
    lps_labels, _ = lps_copy(labels, affine)
    overlay = (labels == BODY_LABELS["liver"]).astype(np.float32) * 0.01
    lps_overlay, _ = lps_copy(overlay, affine)
    point, lps_point = (25, 10, 12), (image.shape[0] - 1 - 25, image.shape[1] - 1 - 10, 12)

    importlib.import_module("scripts.semantic_search") if bundle_scripts("ctfm_retrieval") else None
    search = sys.modules["scripts.semantic_search"]
    search.save_overlay_png(image, overlay, point, "t", tmp_path / "ras.png", affine=affine, label="x")
    search.save_overlay_png(lps_image, lps_overlay, lps_point, "t", tmp_path / "lps.png", affine=lps_affine, label="x")
    np.testing.assert_array_equal(imread(tmp_path / "ras.png"), imread(tmp_path / "lps.png"))

    bundle_scripts("ctfm_wholebody_seg")
    segment = importlib.import_module("scripts.segment")
    segment.write_preview(image, labels, affine, tmp_path / "ras_seg.png", "t")
    segment.write_preview(lps_image, lps_labels, lps_affine, tmp_path / "lps_seg.png", "t")
    np.testing.assert_array_equal(imread(tmp_path / "ras_seg.png"), imread(tmp_path / "lps_seg.png"))


def test_png_writers_use_the_one_display_helper():
    """No bundle draws a CT slice itself: ``imshow`` appears only in ``ctfm_common/display.py``."""
    offenders = []
    for path in sorted(BUNDLES_DIR.glob("*/scripts/**/*.py")) + sorted((REPO_ROOT / "ctfm_common").glob("*.py")):
        if path.name != "display.py" and re.search(r"\.imshow\(", path.read_text()):
            offenders.append(str(path.relative_to(REPO_ROOT)))
    assert offenders == []
