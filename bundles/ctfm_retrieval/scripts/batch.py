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
"""Per-scan batch work that goes on past a bad scan and reports it (query, saliency, test-retest)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .ctfm_common.runtime import write_error_list
from .ctfm_common.validate import describe_failure

logger = logging.getLogger("ctfm_retrieval.batch")


def run_each(
    sources: Sequence[str], work: Callable[[int], Any], *, errors_file: str | Path | None, what: str
) -> list[tuple[int, Any]]:
    """``work(i)`` for each of ``sources``; a scan that fails is named with its problem and skipped.

    The failures are logged and go to ``errors_file`` when given (CSV ``source,error``, written
    atomically; a stale one is removed when every scan succeeds).

    Args:
        sources: the scan behind each item (what a failure names).
        work: does item ``i``.
        errors_file: where the failures are listed (None: the log only).
        what: what is made per scan, for the messages (e.g. "embed for the query").

    Returns:
        ``(i, work(i))`` for the items that succeeded.

    Raises:
        RuntimeError: every item failed (each one named).
    """
    done, errors = [], []
    for i, source in enumerate(sources):
        try:
            done.append((i, work(i)))
        except Exception as e:  # any reader/transform/model failure: report it, go on with the others
            line = describe_failure(str(source), e)
            logger.error(f"cannot {what}: {line}; going on with the others")
            errors.append({"source": str(source), "error": line[len(str(source)) + 2 :]})
    if errors_file is not None and write_error_list(errors_file, errors, ("source", "error"), "\n"):
        logger.error(f"{len(errors)} of {len(sources)} scan(s) failed, listed in {errors_file}")
    if sources and not done:
        failures = "; ".join(f"{e['source']}: {e['error']}" for e in errors)
        raise RuntimeError(f"cannot {what}: every scan failed: {failures}")
    return done
