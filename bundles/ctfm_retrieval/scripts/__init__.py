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
"""Bundle code that MONAI does not provide. ``ctfm_common`` is generated (ctfm-sync-bundles)."""

from __future__ import annotations

import os

from . import ctfm_common  # noqa: F401
from .ctfm_common import cases, checkpoint, encoder, inputs, runtime, validate  # noqa: F401

runtime.install_error_hook()  # a refused input or setting ends in one line, not a traceback

# The folder holding configs/ and scripts/: configs derive every path from it, so a bundle
# runs from any working directory (``monai.bundle run`` puts this folder on sys.path).
BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
