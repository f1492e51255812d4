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
"""Label sets: the 117 TotalSegmentator v2 names (from metadata.json) and user label maps."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path


def read_label_map(label_map: str | os.PathLike | Mapping | None) -> dict[int, int] | None:
    """Read a label map ``{source_value: target_value}`` (a JSON file path or a dict).

    Source values absent from the map become background (0), so a map can select a subset
    of structures (``{"5": 1, "1": 2}``: liver -> 1, spleen -> 2) or translate another label
    set to these indices.

    Args:
        label_map: JSON path, mapping, or empty / ``None`` for no remapping.

    Returns:
        The mapping with int keys and values, or ``None``.

    Raises:
        ValueError: malformed JSON or non-integer / negative values, naming the file.
    """
    if label_map is None or (isinstance(label_map, (str, os.PathLike)) and not os.fspath(label_map)):
        return None
    name = "label_map"
    if not isinstance(label_map, Mapping):
        name = os.fspath(label_map)
        try:
            label_map = json.loads(Path(name).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"label map file not found: {name}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: not valid JSON ({e}).") from e
    if not isinstance(label_map, Mapping) or not label_map:
        raise ValueError(f"{name}: a label map must be a non-empty JSON object {{source_value: target_value}}.")
    try:
        mapping = {int(k): int(v) for k, v in label_map.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: keys and values must be integers ({e}).") from e
    if min(mapping) < 0 or min(mapping.values()) < 0:
        raise ValueError(f"{name}: label values must be >= 0.")
    return mapping


def num_classes_for(mapping: Mapping[int, int] | None, default: int) -> int:
    """Output channels (with background) a label map needs: ``max(target) + 1``, else ``default``."""
    return default if not mapping else max(mapping.values()) + 1


def read_label_names(source: str | os.PathLike | Mapping | None) -> dict[int, str]:
    """``{index: name}`` from a ``metadata.json`` (its ``outputs.pred.channel_def``), a JSON file
    ``{index: name}`` (or ``{"labels": {...}}``), or a mapping; ``{}`` for none."""
    if isinstance(source, Mapping):
        names = source
    elif source:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"label names file not found: {source}")
        names = json.loads(Path(source).read_text())
        if "network_data_format" in names:
            names = names["network_data_format"]["outputs"]["pred"].get("channel_def", {})
        names = names.get("labels", names)
    else:
        names = {}
    return {int(k): str(v) for k, v in names.items()}


def label_names(source: str | os.PathLike | Mapping | None, num_classes: int) -> dict[int, str]:
    """Names of the output channels.

    Args:
        source: see :func:`read_label_names`.
        num_classes: channels; indices without a name are called ``class_<index>``.

    Returns:
        ``{index: name}`` for ``0 .. num_classes - 1``.
    """
    names = read_label_names(source)
    return {i: names.get(i, "background" if i == 0 else f"class_{i}") for i in range(num_classes)}


def select_labels(selection: str | int | Sequence[str | int] | None, names: Mapping[int, str]) -> list[int]:
    """Label indices from a selection of indices and/or names (``"all"``: every foreground label).

    Args:
        selection: e.g. ``["liver", "spleen", 5]``, ``"liver,spleen"``, ``"all"``, or empty for none.
        names: ``{index: name}`` of the output channels (:func:`label_names`).

    Returns:
        Sorted foreground indices.

    Raises:
        ValueError: naming every entry that is neither a known name nor a foreground index.
    """
    if selection in (None, "", [], ()):
        return []
    if isinstance(selection, str) and selection.strip().lower() == "all":
        return sorted(i for i in names if i > 0)
    if isinstance(selection, str) and "," in selection:  # "liver,spleen" from a command line
        selection = [part for part in selection.split(",") if part.strip()]
    if isinstance(selection, (str, int)):
        selection = [selection]
    by_name = {name.lower(): index for index, name in names.items()}
    chosen, unknown = set(), []
    for entry in selection:
        if isinstance(entry, str) and entry.strip().lower() in by_name:
            chosen.add(by_name[entry.strip().lower()])
        elif str(entry).strip().isdigit() and int(entry) > 0 and int(entry) in names:
            chosen.add(int(entry))
        else:
            unknown.append(entry)
    if unknown:
        raise ValueError(f"unknown structure(s) {unknown}: give foreground indices 1..{max(names)} or names "
                         f"such as {', '.join(names[i] for i in sorted(names)[1:4])}")
    return sorted(chosen - {0})


# Coded concepts and display colours of the 117 structures (TotalSegmentator's published mapping;
# the file names its source).
STRUCTURE_CODES = Path(__file__).with_name("structure_codes.json")


def structure_codes(path: str | os.PathLike = STRUCTURE_CODES) -> dict[str, dict]:
    """``{name: entry}`` of the structure table: ``category``, ``type`` and optional ``type_modifier``,
    ``region``, ``region_modifier`` as ``[scheme, code value, code meaning]``, and ``rgb`` (0-255)."""
    return {entry["name"]: entry for entry in json.loads(Path(path).read_text())["structures"]}


def display_colours(names: Mapping[int, str], codes: Mapping[str, Mapping] | None = None) -> dict[int, tuple]:
    """A recommended display colour (sRGB 0-255) for every foreground index of ``names``.

    Structures of the table keep their published colour; others (user label sets, ``class_<i>``)
    get colours spread around the hue circle (golden angle) that differ from those already used.

    Args:
        names: ``{index: name}`` (index 0, the background, gets no colour).
        codes: the structure table (default: :func:`structure_codes`).

    Returns:
        ``{index: (r, g, b)}``.
    """
    import colorsys

    codes = structure_codes() if codes is None else codes
    colours = {i: tuple(codes[n]["rgb"]) for i, n in names.items() if i > 0 and n in codes}
    used = set(colours.values())
    step = 0
    for index in sorted(i for i in names if i > 0 and i not in colours):
        while True:
            hue = (step * 0.618033988749895) % 1.0
            rgb = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.75, 0.95))
            step += 1
            if rgb not in used:
                break
        colours[index] = rgb
        used.add(rgb)
    return colours
