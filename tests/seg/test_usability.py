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
"""Whole-body segmentation as a user reaches for it: weights, structure choice, names, CLI, DICOM-SEG codes.

- Missing weights end a ``monai.bundle run`` with one line naming the file and the commands
  that get weights; every bundle's ``large_files.yml`` lists the public CT-FM release, and
  ``download_large_files`` (against a loopback HTTP server) puts it where the default
  ``ckpt`` / ``encoder_ckpt`` look.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BUNDLES_DIR, BUNDLE_NAMES, REPO_ROOT, bundle_scripts, serve_folder

from ctfm_bundles.tools import bundle_scripts_switch

SEG = "ctfm_wholebody_seg"
RELEASES = {
    "ctfm_wholebody_seg": "project-lighter/whole_body_segmentation",
    "ctfm_pretrain": "project-lighter/ct_fm_feature_extractor",
    "ctfm_triage": "project-lighter/ct_fm_feature_extractor",
    "ctfm_retrieval": "project-lighter/ct_fm_feature_extractor",
}


def _copy_bundle(bundle: str, dst: Path) -> Path:
    """The bundle folder alone (as the zoo or MONAI Label have it), without weights or run outputs."""
    target = dst / bundle
    shutil.copytree(BUNDLES_DIR / bundle, target, ignore=shutil.ignore_patterns("__pycache__", "eval", "*.pt",
                                                                                "*.safetensors", "*.ts"))
    return target


@pytest.fixture
def loopback_server(tmp_path):
    """A plain HTTP server on 127.0.0.1 serving ``tmp_path / "served"``; yields ``(folder, base_url)``."""
    folder = tmp_path / "served"
    folder.mkdir()
    with serve_folder(folder) as base_url:
        yield folder, base_url


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_large_files_list_the_public_release(bundle):
    """Every bundle's large_files.yml lists the public CT-FM release files (hub ``resolve/main`` URLs) in models/."""
    entries = yaml.safe_load((BUNDLES_DIR / bundle / "large_files.yml").read_text())["large_files"]
    urls = {e["url"] for e in entries}
    release = RELEASES[bundle]
    expected = {f"https://huggingface.co/{release}/resolve/main/{name}" for name in ("model.safetensors",
                                                                                     "config.json")}
    assert expected <= urls
    for entry in entries:
        assert entry["path"].startswith("models/") and set(entry) <= {"path", "url", "hash_val", "hash_type"}


def test_download_large_files_puts_weights_where_ckpt_looks(tmp_path, loopback_server):
    """``monai.bundle download_large_files`` (URLs rewritten to a loopback server) fetches the seg release into
    models/, and configs/inference.json's default ``ckpt`` then resolves to it."""
    from monai.bundle import download_large_files
    from safetensors.torch import save_file

    served, base = loopback_server
    tensors = {"encoder.conv_init.weight": torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)}
    save_file(tensors, str(served / "model.safetensors"))
    (served / "config.json").write_text('{"init_filters": 32}')
    bundle = _copy_bundle(SEG, tmp_path)
    text = (bundle / "large_files.yml").read_text()
    hub = "https://huggingface.co/project-lighter/whole_body_segmentation/resolve/main"
    (bundle / "large_files.yml").write_text(text.replace(hub, base))

    download_large_files(bundle_path=str(bundle))

    weights = bundle / "models" / "model.safetensors"
    assert weights.read_bytes() == (served / "model.safetensors").read_bytes()
    assert _parsed(bundle / "configs" / "inference.json", "ckpt", bundle) == str(weights)
    evaluate = [bundle / "configs" / "train.json", bundle / "configs" / "evaluate.json"]
    assert _parsed(evaluate, "ckpt", bundle) == str(weights)
    for release_bundle in ("ctfm_triage", "ctfm_retrieval"):  # encoder_ckpt defaults to the downloaded folder
        name = "train.json" if release_bundle == "ctfm_triage" else "embed.json"
        config = BUNDLES_DIR / release_bundle / "configs" / name
        assert _parsed(config, "encoder_ckpt", tmp_path / release_bundle) == ""  # nothing downloaded: random init
        (tmp_path / release_bundle / "models" / "ct_fm_feature_extractor").mkdir(parents=True)
        assert _parsed(config, "encoder_ckpt", tmp_path / release_bundle) == str(
            tmp_path / release_bundle / "models" / "ct_fm_feature_extractor")


def _parsed(config: Path | list[Path], key: str, bundle_root: Path) -> str:
    """``key`` of ``config`` resolved with ``bundle_root`` as the bundle folder (the shared encoder module as
    the bundle's ``scripts.encoder``, which is a generated copy of it)."""
    import types

    from monai.bundle import ConfigParser

    from ctfm_common import encoder

    full = {}
    for part in config if isinstance(config, list) else [config]:  # merged in order, as monai.bundle run does
        full.update(ConfigParser.load_config_file(str(part)))
    ids = ("bundle_root", "ckpt_dir", key)  # the ids the weights path derives from (not the heavy imports)
    parser = ConfigParser({k: full[k] for k in ids if k in full},
                          globals={"scripts": types.SimpleNamespace(BUNDLE_ROOT=str(bundle_root), encoder=encoder)})
    return str(parser.get_parsed_content(key))


def test_missing_seg_weights_end_in_one_line(tmp_path):
    """Seg inference without weights: exit 1 with one line naming the missing file and the commands that get
    weights (download_large_files for this bundle folder, the hub release id), and no traceback."""
    bundle = _copy_bundle(SEG, tmp_path)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--init_filters", "8", "--input", str(tmp_path / "ct.nii.gz"), "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "not found" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert str(bundle / "models" / "model.pt") in line
    assert f"python -m monai.bundle download_large_files --bundle_path {bundle}" in line
    assert "project-lighter/whole_body_segmentation" in line


def test_missing_encoder_weights_are_one_line():
    """A missing ``encoder_ckpt`` (every encoder bundle reads it through the shared reader): a ``SystemExit``
    whose one line names the file and the commands that get the public feature extractor."""
    from ctfm_common.encoder import WeightsNotFoundError, read_state_dict

    missing = BUNDLES_DIR / "ctfm_triage" / "models" / "missing" / "model.safetensors"
    with pytest.raises(WeightsNotFoundError) as caught:
        read_state_dict(missing)
    assert isinstance(caught.value, SystemExit)  # monai.bundle run prints it without a traceback
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"encoder weights not found: {missing}")
    assert f"python -m monai.bundle download_large_files --bundle_path {BUNDLES_DIR / 'ctfm_triage'}" in line
    assert "project-lighter/ct_fm_feature_extractor" in line


# --- choosing structures, names with the label map, the Python API and the console command -------------------


def _seg_scripts():
    """The seg bundle's ``scripts`` package under a unique name (no clash with other bundles' ``scripts``)."""
    return bundle_scripts(SEG, "segment", "labels", "dicom_seg")


def test_roi_subset_output_equals_the_full_argmax_restricted():
    """With a roi_subset the network output is cut to [background, chosen..., max of the others] before
    stitching; its argmax mapped back by the config's MapLabelValued equals the full argmax with every other
    structure set to background."""
    from monai.transforms import MapLabelValued

    scripts = _seg_scripts()
    torch.manual_seed(0)
    logits = torch.randn(1, 118, 6, 7, 8)
    subset = [5, 1, 64]
    reduced = scripts.segment.CastOutput(torch.nn.Identity(), torch.float32, keep_channels=subset)(logits)
    assert reduced.shape[1] == len(subset) + 2
    orig, target = scripts.segment.subset_label_values(subset)
    mapped = MapLabelValued(keys="pred", orig_labels=orig, target_labels=target)({"pred": reduced.argmax(1)})["pred"]
    full = logits.argmax(1)
    expected = torch.where(torch.isin(full, torch.tensor(subset)), full, torch.zeros_like(full))
    assert torch.equal(torch.as_tensor(mapped), expected)
    names = scripts.labels.label_names(BUNDLES_DIR / SEG / "configs" / "metadata.json", 118)
    assert scripts.labels.select_labels("liver,spleen", names) == [1, 5]


def test_pyproject_console_script_resolves():
    """``pip install .`` installs ``ctfm-segment`` and the tools' commands: each of pyproject's targets is an
    importable callable, and each tool module's ``python -m`` form runs the same callable."""
    import importlib
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    from ctfm_bundles import bundle_dir, segment

    assert callable(segment)
    assert (bundle_dir(SEG) / "configs" / "inference.json").is_file()
    commands = project["scripts"]
    assert {"ctfm-segment", "ctfm-demo", "ctfm-idc", "ctfm-phantom", "ctfm-package", "ctfm-hub"} <= set(commands)
    for command, target in commands.items():
        module, _, function = target.partition(":")
        target_callable = getattr(importlib.import_module(module), function, None)
        assert callable(target_callable), f"{command}: {target} is not callable"
        if module.startswith("ctfm_bundles.tools."):
            text = Path(importlib.import_module(module).__file__).read_text()
            assert f'if __name__ == "__main__":\n    {function}()' in text, f"{command}: python -m {module} differs"


def liver_everywhere_weights(path: Path) -> Path:
    """Tiny seg weights (init_filters 8) whose output heads favour the liver everywhere (then the stomach)."""
    from monai.networks.nets import SegResNetDS
    from safetensors.torch import save_file

    torch.manual_seed(0)
    network = SegResNetDS(spatial_dims=3, in_channels=1, init_filters=8, blocks_down=[1, 2, 2, 4, 4],
                          out_channels=118, dsdepth=4)
    state = network.state_dict()
    for key in [k for k in state if k.endswith("head.bias")]:
        state[key][5] += 50.0  # liver wins everywhere
        state[key][6] += 40.0  # stomach second
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """``python -m ctfm_bundles.wholebody CT OUT --roi_subset liver,spleen --masks`` on a body phantom with
    tiny weights whose output heads favour the liver (then the stomach): the console command end to end."""
    from ctfm_bundles.tools.synthetic import phantom

    root = tmp_path_factory.mktemp("cli")
    image, labels, affine = phantom.make_body_phantom(shape=(40, 32, 24), spacing=(8.0, 8.0, 10.0), seed=1)
    phantom.save_phantom(image, labels, affine, image_path=root / "ct.nii.gz", label_path=root / "ct_labels.nii.gz")
    liver_everywhere_weights(root / "tiny.safetensors")
    out = root / "out"
    cmd = [sys.executable, "-m", "ctfm_bundles.wholebody", str(root / "ct.nii.gz"), str(out), "--roi_subset",
           "liver,spleen", "--masks", "--ckpt", str(root / "tiny.safetensors"), "--device", "cpu",
           "--init_filters", "8", "--spacing", "[8.0, 8.0, 8.0]", "--patch_size", "[32, 32, 32]", "--amp", "False"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))  # what `pip install .` provides; run from elsewhere
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "segmented 1 of 1 case(s)" in proc.stdout
    return out / "ct", root


def test_cli_restricts_outputs_and_statistics_to_the_roi_subset(cli_run):
    """Label map, statistics and one mask per chosen structure hold the roi_subset only (liver; spleen absent)."""
    import csv

    import nibabel as nib
    import numpy as np

    folder, root = cli_run
    seg = nib.load(folder / "ct_seg.nii.gz")
    values = set(np.unique(np.asarray(seg.dataobj)).tolist())
    assert values == {5} and seg.shape == nib.load(root / "ct.nii.gz").shape
    rows = list(csv.DictReader(open(folder / "ct_structures.csv")))
    assert [r["name"] for r in rows] == ["liver"]
    assert sorted(p.name for p in (folder / "masks").iterdir()) == ["liver.nii.gz", "spleen.nii.gz"]
    liver = np.asarray(nib.load(folder / "masks" / "liver.nii.gz").dataobj)
    assert np.array_equal(liver, np.asarray(seg.dataobj) == 5)
    assert not np.asarray(nib.load(folder / "masks" / "spleen.nii.gz").dataobj).any()


def test_cli_on_a_dicom_series_writes_every_output_a_reader_needs(tmp_path):
    """``ctfm-segment <DICOM series folder> OUT --dicom_seg``: the label map on the series' grid with its colour
    table, per-structure statistics by name, a preview with its legend, and a DICOM-SEG that highdicom reads
    back with the structure's SNOMED CT type, referencing the source series."""
    import csv

    import nibabel as nib
    import numpy as np
    from bad_inputs import write_ct_series

    highdicom = pytest.importorskip("highdicom")
    series = tmp_path / "chest_series"
    write_ct_series(series, [2.0 * i for i in range(20)], size=40)
    ckpt = liver_everywhere_weights(tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ctfm_bundles.wholebody", str(series), str(out), "--dicom_seg", "--ckpt", str(ckpt),
           "--device", "cpu", "--init_filters", "8", "--spacing", "[4.0, 4.0, 4.0]", "--patch_size", "[32, 32, 32]",
           "--amp", "False"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert proc.returncode == 0 and "segmented 1 of 1 case(s)" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = out / "chest_series"
    seg = nib.load(folder / "chest_series_seg.nii.gz")
    assert seg.shape == (40, 40, 20) and np.allclose(np.abs(np.diag(seg.affine))[:3], [2.0, 2.0, 2.0])
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 5} and (np.asarray(seg.dataobj) == 5).any()
    assert "liver" in (folder / "chest_series_seg.ctbl").read_text()
    assert [r["name"] for r in csv.DictReader(open(folder / "chest_series_structures.csv"))] == ["liver"]
    assert (folder / "chest_series_preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dicom_seg = highdicom.seg.segread(str(folder / "chest_series_seg.dcm"))
    (segment,) = dicom_seg.SegmentSequence
    assert segment.SegmentLabel == "liver" and segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"
    source_uid = __import__("pydicom").dcmread(sorted(series.iterdir())[0], stop_before_pixels=True).SeriesInstanceUID
    assert dicom_seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source_uid


def test_cli_carries_names_and_colours_with_the_label_map(cli_run):
    """A colour table beside the NIfTI and a Slicer .seg.nrrd name each structure with its TotalSegmentator
    colour; the .seg.nrrd voxels and geometry equal the NIfTI's."""
    import json

    import nibabel as nib
    import nrrd
    import numpy as np

    folder, _ = cli_run
    codes = {s["name"]: s for s in json.loads((BUNDLES_DIR / SEG / "scripts" / "structure_codes.json").read_text())
             ["structures"]}
    table = [line.split() for line in (folder / "ct_seg.ctbl").read_text().splitlines() if not line.startswith("#")]
    assert table[1:] == [["1", "spleen", *map(str, codes["spleen"]["rgb"]), "255"],
                         ["5", "liver", *map(str, codes["liver"]["rgb"]), "255"]]
    data, header = nrrd.read(str(folder / "ct.seg.nrrd"))
    seg = nib.load(folder / "ct_seg.nii.gz")
    assert np.array_equal(data, np.asarray(seg.dataobj))
    assert header["Segment0_Name"] == "liver" and header["Segment0_LabelValue"] == "5"
    rgb = [float(c) * 255 for c in header["Segment0_Color"].split()]
    np.testing.assert_allclose(rgb, codes["liver"]["rgb"], atol=0.01)
    lps = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(header["space directions"], (lps @ seg.affine[:3, :3]).T, atol=1e-5)
    np.testing.assert_allclose(header["space origin"], lps @ seg.affine[:3, 3], atol=1e-5)


def test_preview_legend_lists_present_structures_in_distinct_colours():
    """The preview's legend: every structure present, by name, each in its own colour (all 117 distinct)."""
    import numpy as np

    scripts = _seg_scripts()
    names = scripts.labels.label_names(BUNDLES_DIR / SEG / "configs" / "metadata.json", 118)
    colours = scripts.labels.display_colours(names)
    assert len(colours) == 117 and len(set(colours.values())) == 117
    labels = np.zeros((4, 4, 4), dtype=np.int32)
    labels[0, 0, 0], labels[1, 1, 1], labels[2, 2, 2] = 5, 86, 87
    entries = scripts.segment.legend_entries(labels, names, colours)
    assert [(i, n) for i, n, _ in entries] == [(5, "liver"), (86, "autochthon_left"), (87, "autochthon_right")]
    assert len({rgb for _, _, rgb in entries}) == 3
    user = scripts.labels.display_colours({0: "background", 1: "lesion", 2: "cyst", 3: "liver"})
    assert len(set(user.values())) == 3 and user[3] == tuple(scripts.labels.structure_codes()["liver"]["rgb"])


# --- DICOM-SEG: coded concepts, laterality, colours, the bundle's version -------------------------------------


def test_dicom_seg_codes_colours_and_version(tmp_path, shared_data):
    """Every segment of the DICOM-SEG carries its SNOMED CT category and type from the structure table, the
    laterality of paired organs as the type modifier, its recommended display colour (CIELab of the table's
    RGB), and SoftwareVersions / algorithm version equal the bundle's metadata.json version."""
    import json

    import nibabel as nib
    import numpy as np
    from monai.transforms import LoadImage

    highdicom = pytest.importorskip("highdicom")
    pydicom = pytest.importorskip("pydicom")
    scripts = _seg_scripts()
    series = shared_data / "totalseg_example" / "dicom"
    image = LoadImage(image_only=True, reader="ITKReader")(str(series))
    labels = np.asarray(nib.load(shared_data / "totalseg_example" / "dicom_labels.nii.gz").dataobj).astype(np.int32)
    assert labels.shape == tuple(image.shape)
    kept = [5, 8, 86, 87, 97]  # liver, a right adrenal, both autochthon muscles, a left rib: few segments, fast
    labels[~np.isin(labels, kept)] = 0
    names = scripts.labels.label_names(BUNDLES_DIR / SEG / "configs" / "metadata.json", 118)
    out = scripts.dicom_seg.write_dicom_seg(labels, np.asarray(image.affine), series, tmp_path / "seg.dcm", names)

    version = json.loads((BUNDLES_DIR / SEG / "configs" / "metadata.json").read_text())["version"]
    codes = scripts.labels.structure_codes()
    seg = highdicom.seg.segread(str(out))
    raw = pydicom.dcmread(str(out))
    assert raw.SoftwareVersions == version
    present = [int(v) for v in np.unique(labels) if v > 0]
    assert len(seg.SegmentSequence) == len(present)
    for number, value in enumerate(present, start=1):
        entry = codes[names[value]]
        description = seg.get_segment_description(number)
        assert description.segment_label == names[value]
        assert description.segmented_property_category.value == entry["category"][1]
        assert description.segmented_property_type.value == entry["type"][1]
        assert description.segmented_property_type.scheme_designator == "SCT"
        assert description.algorithm_identification[0].AlgorithmVersion == version
        item = raw.SegmentSequence[number - 1]
        modifier = item.SegmentedPropertyTypeCodeSequence[0].get("SegmentedPropertyTypeModifierCodeSequence")
        if "type_modifier" in entry:
            assert modifier[0].CodeValue == entry["type_modifier"][1]
        else:
            assert not modifier
        assert list(item.RecommendedDisplayCIELabValue) == scripts.dicom_seg.rgb_to_dicom_lab(entry["rgb"])
    by_name = {raw.SegmentSequence[n].SegmentLabel: raw.SegmentSequence[n] for n in range(len(present))}
    left = by_name["autochthon_left"].SegmentedPropertyTypeCodeSequence[0]
    right = by_name["autochthon_right"].SegmentedPropertyTypeCodeSequence[0]
    assert (left.CodeValue, left.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning) == ("244849004", "Left")
    assert right.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Right"
    assert by_name["liver"].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"
    # white and a pure colour land where CIELab puts them (L* 100; red's a* positive)
    assert scripts.dicom_seg.rgb_to_dicom_lab((255, 255, 255))[0] == 65535
    red = scripts.dicom_seg.rgb_to_dicom_lab((255, 0, 0))
    assert red[1] > 65535 * 128 / 255


@pytest.fixture
def seg_config(tmp_path):
    """Run the seg bundle's ``configs/inference.json`` in this process (its ``scripts`` on ``sys.path``, as
    ``monai.bundle run`` puts it) with a given network and overrides; returns the case's summary record."""
    from monai.bundle import ConfigParser


    def run(network: torch.nn.Module, out: Path, **overrides) -> dict:
        parser = ConfigParser()
        parser.read_config(str(BUNDLES_DIR / SEG / "configs" / "inference.json"))
        parser.update({"output_dir": str(out), "network": network, "ckpt": "", "device": "cpu", "amp": False,
                       "progress": False, "save_preview": False, "save_csv": False, **overrides})
        parser.get_parsed_content("run")
        import json

        return json.loads((out / "summary.json").read_text())["cases"][0]

    with bundle_scripts_switch() as use:
        use(BUNDLES_DIR / SEG)
        yield run


def _pointwise_liver_network() -> torch.nn.Module:
    """A 118-channel network whose output at a voxel depends on that voxel only (1x1x1 convolution):
    liver (label 5) where the scaled intensity is above 300 HU's neighbourhood, background elsewhere. With
    no spatial context, the stitched logits of a crop equal the whole scan's inside the crop, exactly."""
    network = torch.nn.Conv3d(1, 118, kernel_size=1)
    with torch.no_grad():
        network.weight.zero_()
        network.bias.fill_(-1.0)
        network.bias[0] = 0.0  # background
        threshold = (170.0 + 1024.0) / 3072.0  # between soft tissue (40 HU) and the bright block (300 HU)
        network.weight[5] = 100.0
        network.bias[5] = -100.0 * threshold
    return network.eval()


def test_roi_subset_crop_segments_the_chosen_structures_box_only(seg_config, tmp_path, caplog):
    """With a roi_subset at the full preset, a coarse pass at the fast preset's 3 mm finds the chosen
    structures, the 1.5 mm pass runs on their box plus 20 mm only, and the label map pasted back into the
    full grid equals the uncropped one (a network without spatial context: exactly); without the chosen
    structures in the scan the whole scan is segmented, with one log line."""
    import logging

    import nibabel as nib
    import numpy as np

    image = np.full((64, 56, 48), 40.0, dtype=np.float32)  # soft tissue everywhere, 1.5 mm voxels
    image[6:14, 8:16, 30:38] = 300.0  # the "liver": a bright block near one corner
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(np.full_like(image, 40.0), affine), str(tmp_path / "no_liver.nii.gz"))
    network = _pointwise_liver_network()
    settings = {"roi_subset": "liver,spleen", "roi_size": [32, 32, 32], "speed_presets#fast#patch_size": [32, 32, 32]}
    with caplog.at_level(logging.INFO):
        cropped = seg_config(network, tmp_path / "crop", input=str(tmp_path / "ct.nii.gz"), **settings)
        whole = seg_config(network, tmp_path / "whole", input=str(tmp_path / "ct.nii.gz"), roi_subset_crop=False,
                           **settings)
    crop = cropped["roi_subset_crop"]
    assert crop["image_shape"] == [48, 56, 64]  # SPL order
    assert np.prod(crop["crop_shape"]) < np.prod(crop["image_shape"]) / 4, crop  # the full pass's input shrank
    assert any("roi_subset: full-resolution pass on" in r.getMessage() for r in caplog.records)
    assert "roi_subset_crop" not in whole
    seg = nib.load(cropped["outputs"]["label_map"])
    assert seg.shape == image.shape and np.allclose(seg.affine, affine)
    labels = np.asarray(seg.dataobj)
    np.testing.assert_array_equal(labels, np.asarray(nib.load(whole["outputs"]["label_map"]).dataobj))
    expected = np.zeros(image.shape, dtype=np.uint8)
    expected[6:14, 8:16, 30:38] = 5
    np.testing.assert_array_equal(labels, expected)
    # the GPU default (MONAI's stitched float16 logits, no slab argmax): logits pasted, background outside
    logits = seg_config(network, tmp_path / "logits", input=str(tmp_path / "ct.nii.gz"), slab_argmax=False,
                        **settings)
    assert logits["roi_subset_crop"] == crop
    np.testing.assert_array_equal(np.asarray(nib.load(logits["outputs"]["label_map"]).dataobj), expected)
    # the box (SPL voxels of the preprocessed grid; the block is at S 30:38, P 40:48, L 50:58) holds the
    # block plus the 20 mm margin (14 voxels), clipped to the grid, and little more (the 3 mm pass's blur)
    for (start, stop), (low, high), size in zip(crop["box"], [(30, 38), (40, 48), (50, 58)], crop["image_shape"]):
        assert max(0, low - 14) - 4 <= start <= max(0, low - 14) and min(size, high + 14) <= stop <= min(size, high + 18)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        fallback = seg_config(network, tmp_path / "fallback", input=str(tmp_path / "no_liver.nii.gz"), **settings)
    assert fallback["roi_subset_crop"]["crop_shape"] == fallback["roi_subset_crop"]["image_shape"]
    assert [r.getMessage() for r in caplog.records if "found none of the chosen structures" in r.getMessage()]
    assert not np.asarray(nib.load(fallback["outputs"]["label_map"]).dataobj).any()
