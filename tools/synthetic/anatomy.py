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
"""The phantoms' anatomy as data: label registries, TotalSegmentator indices, HU, and the nominal body and head
(millimetres) that every phantom is scaled from."""

from __future__ import annotations

from typing import Any

# ---------------------------------------------------------------------------------------
# Registries (data only: the CLI, the bundles and the tests all read these).
# ---------------------------------------------------------------------------------------

#: Label value of each structure in a body phantom label map (0 = air / background).
BODY_LABELS: dict[str, int] = {
    "soft_tissue": 1,
    "fat": 2,
    "lung_left": 3,
    "lung_right": 4,
    "heart": 5,
    "liver": 6,
    "spleen": 7,
    "kidney_left": 8,
    "kidney_right": 9,
    "vertebrae": 10,
    "rib_left": 11,
    "rib_right": 12,
    "aorta": 13,
}

#: Label value of each structure in a head phantom label map (0 = air / background).
HEAD_LABELS: dict[str, int] = {
    "brain": 1,
    "skull": 2,
    "lesion": 3,
    "scalp": 4,
}

#: TotalSegmentator v2 (task ``total``) class index of each phantom structure that has
#: one; structures absent here (soft tissue, fat, scalp) map to background 0. Single
#: phantom structures stand in for one representative TotalSegmentator class.
TOTALSEG_INDEX: dict[str, int] = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "liver": 5,
    "lung_left": 10,  # lung_upper_lobe_left
    "lung_right": 12,  # lung_upper_lobe_right
    "vertebrae": 31,  # vertebrae_L1
    "heart": 51,
    "aorta": 52,
    "brain": 90,
    "skull": 91,
    "rib_left": 96,  # rib_left_5
    "rib_right": 108,  # rib_right_5
    "lesion": 90,  # a haemorrhage lies inside the brain: TotalSegmentator calls it brain
}

#: Typical HU of each body structure and the +- range a seed jitters it by.
BODY_HU: dict[str, tuple[float, float]] = {
    "air": (-1000.0, 0.0),
    "soft_tissue": (40.0, 5.0),
    "fat": (-100.0, 10.0),
    "lung_left": (-850.0, 25.0),
    "lung_right": (-850.0, 25.0),
    "heart": (45.0, 5.0),
    "liver": (60.0, 5.0),
    "spleen": (50.0, 5.0),
    "kidney_left": (35.0, 5.0),
    "kidney_right": (35.0, 5.0),
    "vertebrae": (550.0, 100.0),
    "rib_left": (650.0, 100.0),
    "rib_right": (650.0, 100.0),
    "aorta": (50.0, 5.0),
}

#: Typical HU of each head structure and the +- range a seed jitters it by.
HEAD_HU: dict[str, tuple[float, float]] = {
    "air": (-1000.0, 0.0),
    "brain": (35.0, 3.0),
    "skull": (1000.0, 80.0),
    "lesion": (70.0, 5.0),  # acute (hyperdense) haemorrhage
    "scalp": (40.0, 5.0),
}

PHANTOM_KINDS: tuple[str, ...] = ("body", "head")

#: Smallest number of voxels per axis a phantom may have.
MIN_SIZE = 16

#: Fewest voxels the torso or head must span along ``i`` and ``j``: below this the
#: organs cannot all be resolved and the phantom functions raise ValueError.
MIN_SPAN_VOXELS = 12

# HU range written to the int16 image (the usual CT storage range).
HU_MIN, HU_MAX = -1024, 3071

# Nominal body (mm): torso half-widths; every in-plane length below is on this scale.
TORSO_HALF_X, TORSO_HALF_Y, TORSO_LENGTH = 175.0, 125.0, 400.0
# Nominal head (mm): outer (scalp) half-widths.
HEAD_HALF = (75.0, 95.0, 80.0)
# Fraction of the field of view the body or head fills on its limiting axis.
FILL = 0.92

# Body organs modelled as ellipsoids. centre = (x mm, y mm, z as a fraction of the
# field of view length from its inferior edge), semi = (x mm, y mm, z fraction), yaw in
# degrees (rotation about the S-I axis), paint_over = labels the organ may replace.
# +x is the patient's right, +y anterior (RAS).
BODY_ELLIPSOIDS: tuple[dict[str, Any], ...] = (
    {"name": "lung_right", "centre": (72.0, 0.0, 0.77), "semi": (58.0, 78.0, 0.19), "yaw": 0.0,
     "paint_over": ("soft_tissue",)},
    {"name": "lung_left", "centre": (-72.0, 0.0, 0.76), "semi": (56.0, 78.0, 0.20), "yaw": 0.0,
     "paint_over": ("soft_tissue",)},
    {"name": "heart", "centre": (-15.0, 30.0, 0.64), "semi": (55.0, 48.0, 0.10), "yaw": -25.0,
     "paint_over": ("soft_tissue", "lung_left", "lung_right")},
    {"name": "liver", "centre": (70.0, 5.0, 0.44), "semi": (78.0, 80.0, 0.13), "yaw": 0.0,
     "paint_over": ("soft_tissue", "lung_right")},
    {"name": "liver", "centre": (10.0, 45.0, 0.47), "semi": (50.0, 32.0, 0.07), "yaw": 0.0,
     "paint_over": ("soft_tissue",)},  # left lobe, crossing the midline anteriorly
    {"name": "spleen", "centre": (-92.0, -35.0, 0.46), "semi": (28.0, 50.0, 0.07), "yaw": 30.0,
     "paint_over": ("soft_tissue", "lung_left")},
    # Perirenal fat first, so the kidneys stand out from the soft tissue as on real CT.
    {"name": "perirenal_fat", "centre": (62.0, -60.0, 0.28), "semi": (40.0, 48.0, 0.11), "yaw": -30.0,
     "paint_over": ("soft_tissue",)},
    {"name": "perirenal_fat", "centre": (-62.0, -60.0, 0.31), "semi": (40.0, 48.0, 0.11), "yaw": 30.0,
     "paint_over": ("soft_tissue",)},
    {"name": "kidney_right", "centre": (62.0, -60.0, 0.28), "semi": (26.0, 34.0, 0.08), "yaw": -30.0,
     "paint_over": ("soft_tissue", "perirenal_fat", "liver")},
    {"name": "kidney_left", "centre": (-62.0, -60.0, 0.31), "semi": (26.0, 34.0, 0.08), "yaw": 30.0,
     "paint_over": ("soft_tissue", "perirenal_fat", "spleen")},
)
# Descending aorta: a vertical tube left-anterior of the spine up to the aortic arch.
AORTA = {"centre": (-28.0, -28.0), "radius": 12.0, "top": 0.72}
# Vertebral column (mm): body ellipse, spinal canal, arch and spinous process; segments.
SPINE = {"body_y": -55.0, "body_semi": (20.0, 16.0), "canal_radius": 9.0, "arch_thickness": 6.0,
          "spinous_length": 16.0, "spinous_half_width": 3.5, "segments": 12, "disc_fraction": 0.22}
# Ribs: arcs on an ellipse just inside the subcutaneous fat, anterior ends lower.
RIBS = {"count": 5, "z_first": 0.60, "z_last": 0.92, "inset": 12.0, "thickness": 8.0,
         "z_half_thickness": 5.0, "tilt": 22.0, "posterior_gap": 24.0, "anterior_gap": 42.0}
SKIN_MM, FAT_MM = 3.0, 20.0
