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
"""ctfm_retrieval embedding: embed.json over a glob (one file per scan, bad files listed), patch centres in
the world, shards, aggregations, and stale or clashing outputs; run through ``monai.bundle`` as a user does.

Small phantoms (tools/synthetic/phantom.py), the real ``ct_small`` when ../shared/data is there,
``init_filters=8`` and 8 x 32 x 32 patches keep it fast on the CPU (data: the retrieval section of conftest.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    RETRIEVAL as BUNDLE,
    RETRIEVAL_BODY as BODY,
    RETRIEVAL_FAST as FAST,
    RETRIEVAL_HEAD as HEAD,
    SHARED_DATA,
    read_csv_rows as rows_of,
    read_safetensors as read,
    retrieval_case_names as expected_cases,
    run_bundle,
    retrieval_scripts,
)

from ctfm_bundles.tools.synthetic import phantom

scripts = retrieval_scripts()


def test_embed_writes_one_file_per_scan_and_the_index(scans, embedded):
    emb = embedded["emb"]
    cases = expected_cases(scans)
    assert sorted(p.stem for p in emb.glob("*.safetensors")) == cases
    rows = rows_of(emb / "index.csv")
    assert [r["case"] for r in rows] == cases
    assert list(rows[0]) == ["case", "source", "file", "dim", "label"]
    for row in rows:
        assert row["dim"] == "128" and row["file"] == f"{row['case']}.safetensors"
        assert Path(row["source"]).name == f"{row['case']}.nii.gz"
        tensors, meta = read(emb / row["file"])
        assert set(tensors) == {"embedding", "patch_embeddings", "patch_centers_world"}
        n = tensors["patch_embeddings"].shape[0]
        assert tensors["embedding"].shape == (128,) and tensors["patch_embeddings"].shape == (n, 128)
        assert tensors["patch_centers_world"].shape == (n, 3) and n == int(meta["num_patches"]) > 1
        assert meta["source"] == row["source"] and meta["aggregation"] == "min"
        assert json.loads(meta["patch_size"]) == [8, 32, 32] and json.loads(meta["spacing"]) == [3.0, 1.0, 1.0]
        assert meta["init_filters"] == "8" and meta["encoder_ckpt"] == scans["ckpt"]
        # min aggregation is the element-wise min over the stored patch embeddings
        assert torch.equal(tensors["embedding"], tensors["patch_embeddings"].amin(0))
    assert not list(emb.glob(".*tmp*")), "no temporary files left behind"


def test_bad_file_is_reported_and_the_others_are_done(embedded):
    assert "broken.nii.gz: cannot embed this scan" in embedded["log"]
    errors = rows_of(embedded["emb"] / "errors.csv")
    assert [e["case"] for e in errors] == ["broken"] and errors[0]["source"].endswith("broken.nii.gz")
    assert not (embedded["emb"] / "broken.safetensors").exists()


@pytest.mark.parametrize("case", [*BODY, *HEAD, "ct_small"])
def test_patch_centres_lie_inside_the_scans_world_bounding_box(case, scans, embedded):
    if case == "ct_small" and not scans["real"]:
        pytest.skip(f"real CT test data not found at {SHARED_DATA}")
    image = nib.load(str(scans["root"] / "scans" / f"{case}.nii.gz"))
    corners = np.array(
        [[i, j, k] for i in (0, image.shape[0] - 1) for j in (0, image.shape[1] - 1) for k in (0, image.shape[2] - 1)],
        dtype=float,
    )
    world = nib.affines.apply_affine(image.affine, corners)
    low, high = world.min(0), world.max(0)
    centres = read(embedded["emb"] / f"{case}.safetensors")[0]["patch_centers_world"].numpy()
    assert np.all(centres >= low - 1e-3) and np.all(centres <= high + 1e-3), (centres.min(0), centres.max(0), low, high)
    # the patches spread over the scan: their centres span most of its extent along each axis
    assert np.all(centres.max(0) - centres.min(0) > 0.3 * (high - low))


def test_real_ct_embeds(shared_data, embedded):
    tensors, meta = read(embedded["emb"] / "ct_small.safetensors")
    assert meta["source"].endswith("ct_small.nii.gz")
    # 30 x 101 x 122 voxels at 3 mm -> 30 x 301 x 364 (S, P, L) at 3 x 1 x 1 mm (MONAI keeps the end voxel
    # centres), cropped to the body (CropForeground, HU > 0, as CT-FM does) -> 30 x 283 x 353; 8 x 32 x 32
    # patches side by side, the last of each axis touching the end: 4 x 9 x 12 patches
    assert tensors["patch_embeddings"].shape == (4 * 9 * 12, 128)
    assert torch.isfinite(tensors["embedding"]).all()


@pytest.fixture(scope="module")
def sharded(scans, embedded) -> Path:
    """Two shards of embed.json running at the same time, as two processes of a SLURM array would."""
    from concurrent.futures import ThreadPoolExecutor

    out = scans["root"] / "out_b"

    def shard(index: int):
        return run_bundle(
            BUNDLE,
            "embed.json",
            input=scans["glob"],
            output_dir=str(out),
            encoder_ckpt=scans["ckpt"],
            save_patches=True,
            aggregation="min",
            shard_index=index,
            num_shards=2,
            **FAST,
        )

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(shard, (0, 1)))
    return out / "embeddings"


def test_two_shards_give_the_same_files_and_embeddings_as_one(embedded, sharded):
    one, two = embedded["emb"], sharded
    assert sorted(p.name for p in two.glob("*.safetensors")) == sorted(p.name for p in one.glob("*.safetensors"))
    assert not list(two.glob("index.shard*")), "index parts are merged and removed once all shards are done"
    assert (two / "index.csv").read_text() == (one / "index.csv").read_text()
    # deterministic: another process, another shard layout, the same numbers
    for path in one.glob("*.safetensors"):
        a, b = read(path)[0], read(two / path.name)[0]
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_shard_defaults_come_from_torchrun_or_slurm():
    shard = scripts.runtime.default_shard
    assert shard({}) == (0, 1)
    assert shard({"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)
    assert shard({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}) == (1, 3)

@pytest.mark.parametrize("aggregation", ["mean", "max", "min"])
def test_aggregations_equal_hand_computations_over_stored_patches(aggregation, scans, embedded, local):
    """Embedding in this process with each aggregation = that reduction over the workflow's stored patches."""
    embedder = scripts.embedding.ScanEmbedder(
        local["network"], patch_size=(8, 32, 32), overlap=FAST["overlap"], aggregation=aggregation, batch_size=8
    )
    image = local["preprocessing"]({"image": str(scans["root"] / "scans" / "body0.nii.gz")})["image"]
    out = embedder(image, with_patches=True)
    stored = read(embedded["emb"] / "body0.safetensors")[0]
    torch.testing.assert_close(out["patch_embeddings"], stored["patch_embeddings"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["patch_centers_world"], stored["patch_centers_world"])
    patches = stored["patch_embeddings"]
    hand = {"mean": patches.sum(0) / len(patches), "max": patches.max(0).values, "min": patches.min(0).values}
    torch.testing.assert_close(out["embedding"], hand[aggregation], rtol=1e-4, atol=1e-5)


def test_global_aggregation_is_one_pass_over_the_whole_volume(scans, local):
    embedder = scripts.embedding.ScanEmbedder(local["network"], patch_size=(8, 32, 32), aggregation="global")
    image = local["preprocessing"]({"image": str(scans["root"] / "scans" / "head1.nii.gz")})["image"]
    out = embedder(image, with_patches=True)
    with torch.no_grad():
        whole = local["network"].pool(local["network"].encoder(image.as_tensor()[None])[-1]).flatten()
    torch.testing.assert_close(out["embedding"], whole, rtol=1e-5, atol=1e-6)
    assert out["patch_embeddings"].shape[0] == out["patch_centers_world"].shape[0] > 1  # patches still available


def test_empty_encoder_ckpt_warns_loudly(caplog):
    with caplog.at_level("WARNING"):
        scripts.encoder.load_encoder(scripts.encoder.PooledEncoderHead(init_filters=8), "")
    assert "RANDOMLY INITIALISED" in caplog.text

def test_weights_overwritten_at_the_same_path_make_embeddings_stale(scans, local, tmp_path):
    """Embeddings are identified by the encoder's content: other weights at the same path re-embed, and an
    index of the old embeddings refuses the new settings."""
    ckpt = tmp_path / "encoder.safetensors"
    shutil.copy(scans["ckpt"], ckpt)
    items = [{"image": str(scans["root"] / "scans" / "body0.nii.gz")}]

    def embed(network) -> dict:
        settings = scripts.embedding.embedding_settings(
            aggregation="min", patch_size=(8, 32, 32), overlap=0.0, spacing=(3.0, 1.0, 1.0), init_filters=8,
            encoder_ckpt=str(ckpt),
        )
        embedder = scripts.embedding.ScanEmbedder(network, patch_size=(8, 32, 32), overlap=0.0, batch_size=8)
        result = scripts.embedding.embed_dataset(
            items=items, preprocessing=local["preprocessing"], embedder=embedder, output_dir=str(tmp_path / "out"),
            settings=settings,
        )
        return {"settings": settings, **result}

    first = embed(local["network"])
    assert first["done"] == ["body0"] and len(first["settings"]["encoder_sha256"]) == 64
    torch.manual_seed(1)
    other = scripts.encoder.PooledEncoderHead(init_filters=8)
    scripts.encoder.save_encoder_weights(other, ckpt)  # the same path, other weights
    second = embed(scripts.encoder.load_encoder(other, str(ckpt)).eval())
    assert second["done"] == ["body0"] and not second["skipped"], "stale embedding kept"
    diff = scripts.vector_index.settings_diff(first["settings"], second["settings"])
    assert list(diff) == ["encoder_sha256"]
    stored = read(tmp_path / "out" / "embeddings" / "body0.safetensors")[1]
    assert stored["encoder_sha256"] == second["settings"]["encoder_sha256"]


def test_same_stem_scans_keep_their_own_embedding_row_and_label(scans, tmp_path):
    """``a/ct.nii.gz`` and ``ct_2.nii.gz``, then a run with ``b/ct.nii.gz`` and ``c/ct.nii.gz`` into the same
    folder: four embeddings and rows, none replaced; datalist labels follow each scan's path, not its position."""
    data = tmp_path / "data"
    kinds = {"a/ct.nii.gz": "head", "b/ct.nii.gz": "body", "ct_2.nii.gz": "body", "c/ct.nii.gz": "head"}
    for i, (rel, kind) in enumerate(kinds.items()):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        phantom.write_phantom(output=str(data / rel), kind=kind, shape=(32, 32, 16), spacing=3.0, seed=20 + i)
    out = tmp_path / "out"
    common = dict(output_dir=str(out), encoder_ckpt=scans["ckpt"], **FAST)
    first, second = data / "first.json", data / "second.json"
    first.write_text(json.dumps({"testing": [{"image": r} for r in ("a/ct.nii.gz", "ct_2.nii.gz")]}))
    second.write_text(json.dumps({"testing": [{"image": r} for r in ("b/ct.nii.gz", "c/ct.nii.gz")]}))
    run_bundle(BUNDLE, "embed.json", input=str(first), **common)
    proc = run_bundle(BUNDLE, "embed.json", input=str(second), **common)
    assert "named after their full path" in proc.stdout + proc.stderr
    rows = rows_of(out / "embeddings" / "index.csv")
    by_source = {r["source"]: r for r in rows}
    assert sorted(by_source) == sorted(str(data / r) for r in kinds)  # 4 scans, 4 rows, none replaced
    assert len({r["case"] for r in rows}) == 4 and by_source[str(data / "ct_2.nii.gz")]["case"] == "ct_2"
    assert by_source[str(data / "a" / "ct.nii.gz")]["case"] == "ct"
    for source, row in by_source.items():
        _, metadata = read(out / "embeddings" / row["file"])
        assert metadata["source"] == source
    # labels from a datalist whose first item has no label (the old name-based join shifted them)
    labels = data / "labels.json"
    labels.write_text(json.dumps({"training": [{"image": "ct_2.nii.gz"}, *({"image": r, "label": k} for r, k in kinds.items())]}))
    label_of = scripts.evaluation.read_labels(str(labels), rows)
    assert {by_source[str(data / r)]["case"]: k for r, k in kinds.items()} == label_of
