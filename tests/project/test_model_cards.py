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
"""Model cards: each bundle's ``docs/README.md`` and the hub README (``tools/release/hub.py``) say the intended
use, the training data, the evaluation figures (or plainly that there are none), the limitations and
the licence of the weights."""

from __future__ import annotations

import json
import re

import pytest
from conftest import BUNDLE_NAMES, BUNDLES_DIR

SECTIONS = ("Intended use", "Training data", "Evaluation", "Limitations", "Licence of the weights")


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_bundle_docs_carry_a_complete_model_card(bundle):
    from ctfm_bundles.tools.release import hub

    card = hub.bundle_model_card(BUNDLES_DIR / bundle)
    found = re.findall(r"^### (.+)$", card, re.M)
    assert found == list(SECTIONS), found
    bodies = dict(zip(found, re.split(r"^### .+$", card, flags=re.M)[1:]))
    for name, body in bodies.items():
        assert len(body.split()) >= 10, f"{bundle}: '{name}' is empty"
    evaluation = bodies["Evaluation"]
    assert "No evaluation figures exist" in evaluation or re.search(r"\d\.\d{2,}", evaluation)
    licence = bodies["Licence of the weights"]
    assert "Apache-2.0" in licence and "project-lighter/ct_fm_feature_extractor" in licence
    assert "not for clinical use" in bodies["Intended use"].lower()


def test_hub_readme_carries_the_bundle_model_card():
    from ctfm_bundles.tools.release import hub

    meta = json.loads((BUNDLES_DIR / "ctfm_wholebody_seg" / "configs" / "metadata.json").read_text())
    readme = hub.model_card(meta, "ctfm_wholebody_seg", "SegResNetDS", {"init_filters": 32},
                            "OWNER/NAME", "model.pt", "0" * 64)
    assert hub.bundle_model_card(BUNDLES_DIR / "ctfm_wholebody_seg") in readme
    for name in SECTIONS:
        assert f"### {name}" in readme
