# GENERATED from ctfm_common/__init__.py by ctfm-sync-bundles: edit the source, not this copy.
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
"""Code shared by every CT-FM bundle: the encoder contract and input handling.

This package is the single source of truth. ``ctfm-sync-bundles`` copies it into
each bundle as ``scripts/ctfm_common`` so that a bundle folder runs on its own (model
zoo, MONAI Label); a test fails when a copy drifts from this source.
"""

from __future__ import annotations
