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
"""The main job: run every bundle end to end through ``python -m monai.bundle run``.

On a phantom CT by default, or on the user's CT (``--ct``: a NIfTI/NRRD file or a DICOM
series folder). Training steps run on small phantom corpora (the user's CT joins the
pretraining corpus), at demo scale (``init_filters`` 8, a few iterations), so the job
finishes in minutes on a laptop CPU: the weights it trains show the pipeline, they are not
models. What they learned is measured on held-out phantoms (never trained on) by the bundles'
own evaluation configs and printed at the end (and written to ``summary.json``): segmentation
Dice per structure, triage AUC with its bootstrap 95% CI, retrieval precision@1 of body vs head.
Each step's log is written beside its outputs.

Usage::

    ctfm-demo                         # phantom CT
    ctfm-demo --ct path/to/ct.nii.gz  # your CT
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import fire

from ctfm_bundles.tools import REPO_ROOT
from ctfm_bundles.tools.synthetic import phantom
from ctfm_common.inputs import case_name, resolve_input
from ctfm_common.runtime import atomic_write_text


def cli_value(value) -> str:
    """Spell a Python value for ``monai.bundle``'s fire CLI (``True``, not JSON's ``true``, which fire keeps as a string)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, type(None))):
        return repr(value)
    return json.dumps(value)


def bundle_command(bundle: str, configs: str | list[str], run_id: str = "run", **overrides) -> list[str]:
    """The ``python -m monai.bundle run`` command line for a bundle's configs (merged in order) and overrides."""
    names = [configs] if isinstance(configs, str) else list(configs)
    files = [str(REPO_ROOT / "bundles" / bundle / "configs" / c) for c in names]
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file"]
    cmd.append(files[0] if len(files) == 1 else json.dumps(files))
    for key, value in overrides.items():
        cmd += [f"--{key}", cli_value(value)]
    return cmd


@dataclass
class Step:
    """One ``monai.bundle run`` call of the demo."""

    title: str
    bundle: str
    configs: list[str]
    run_id: str
    overrides: dict
    outputs: dict[str, Path] = field(default_factory=dict)

    def command(self) -> list[str]:
        return bundle_command(self.bundle, self.configs, self.run_id, **self.overrides)


def run_step(step: Step, log_dir: Path) -> float:
    """Run one step, streaming its output to a log file; raise with the log's tail on failure."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{step.bundle}_{step.run_id}_{step.configs[-1].replace('.json', '')}.log"
    print(f"[demo] {step.title} ...", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(step.command()) + "\n\n")
        f.flush()
        proc = subprocess.run(step.command(), stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"[demo] FAILED: {step.title} (exit {proc.returncode}); log {log}\n{tail}")
    missing = [str(p) for p in step.outputs.values() if not Path(p).exists()]
    if missing:
        raise SystemExit(f"[demo] FAILED: {step.title} finished but did not write {missing}; log {log}")
    print(f"[demo]   done in {seconds:.0f} s (log {log.relative_to(REPO_ROOT) if log.is_relative_to(REPO_ROOT) else log})")
    return seconds


def _all_in_validation(datalist: Path) -> Path:
    """Move every item of a phantom datalist to its ``validation`` section (a held-out test set)."""
    content = json.loads(datalist.read_text())
    content["validation"] = content.pop("training", []) + content.get("validation", [])
    content["training"], content["numTraining"] = [], 0
    datalist.write_text(json.dumps(content, indent=2))
    return datalist


def prepare_data(out: Path, ct: str | None, seed: int) -> dict[str, Path]:
    """Write the phantom corpora, the held-out phantoms (and the phantom CT when the user gave none).

    Held-out phantoms have seeds of their own and are never trained on: the demo's learning figures
    (segmentation Dice, triage AUC, retrieval precision@1) are measured on them.
    """
    data = out / "data"
    body_grid = {"shape": (64, 64, 48), "spacing": (6.0, 6.0, 8.0)}
    head_grid = {"shape": (64, 64, 32), "spacing": (3.0, 3.0, 5.0)}
    paths = {
        "body": Path(phantom.make_dataset(output_dir=str(data / "body"), num_cases=SEG_TRAIN_CASES, kind="body",
                                          seed=seed, **body_grid)),
        # held out from every training step
        "heldout_body": _all_in_validation(Path(phantom.make_dataset(
            output_dir=str(data / "heldout_body"), num_cases=SEG_HELDOUT_CASES, kind="body", seed=seed + 1000, **body_grid))),
        # matched pairs (the same head with and without a bleed) to train on, heads to select the model on,
        # and held-out heads (``testing``) to measure it on
        "head": Path(phantom.make_triage_dataset(output_dir=str(data / "head"), seed=seed, **TRIAGE_HEADS, **head_grid)),
    }
    paths["head_case"] = data / "head_test_lesion.nii.gz"
    phantom.write_head_phantom(output=str(paths["head_case"]), lesion=True, seed=seed + 2000, **head_grid)
    if ct is None:
        ct_path = data / "phantom_ct.nii.gz"
        phantom.write_body_phantom(output=str(ct_path), shape=(96, 96, 64), spacing=(4.0, 4.0, 5.0), seed=seed + 1000)
        paths["ct"] = ct_path
    else:
        resolve_input(ct)  # clear error now, not after minutes of training
        paths["ct"] = Path(ct).resolve()
    # the pretraining corpus: the body phantoms' training cases plus the CT itself
    body = json.loads(paths["body"].read_text())
    corpus = [{"image": str((paths["body"].parent / item["image"]).resolve())} for item in body["training"]]
    corpus.append({"image": str(paths["ct"])})
    paths["corpus"] = data / "pretrain_corpus.json"
    paths["corpus"].write_text(json.dumps({"training": corpus}, indent=2))
    # the retrieval database: the CT and every phantom, body and head; the held-out phantoms are
    # labelled body/head for the retrieval evaluation
    database = [{"image": str(paths["ct"])}]
    kinds = []
    for kind in ("body", "heldout_body"):
        images = [{"image": str(p)} for p in sorted((paths[kind].parent / "imagesTr").glob("*.nii.gz"))]
        database += images
        if kind == "heldout_body":
            kinds += [dict(item, label="body") for item in images]
    # as many held-out heads as held-out bodies: a balanced body-vs-head retrieval
    heads = json.loads(paths["head"].read_text())["testing"][: len(kinds)]
    images = [{"image": str(paths["head"].parent / item["image"])} for item in heads]
    database += images
    kinds += [dict(item, label="head") for item in images]
    paths["database"] = data / "retrieval_database.json"
    paths["database"].write_text(json.dumps({"testing": database}, indent=2))
    paths["retrieval_labels"] = data / "retrieval_heldout_labels.json"
    paths["retrieval_labels"].write_text(json.dumps({"testing": kinds}, indent=2))
    return paths


#: The phantom structures the demo's segmentation learns: those larger than 1% of the body
#: (a few classes train in minutes on a CPU; ribs, kidneys, spleen and aorta are left out).
SEG_STRUCTURES: tuple[str, ...] = ("lung_left", "lung_right", "heart", "liver", "vertebrae")
#: Body phantoms written for the segmentation training (the last one validates) and held out.
SEG_TRAIN_CASES, SEG_HELDOUT_CASES = 6, 4
#: Head phantoms for triage: matched training pairs, validation heads, held-out heads.
TRIAGE_HEADS = {"pairs": 16, "validation": 10, "testing": 24}
#: The demo's triage grid and window: the blood window (0/80 HU) on a 5 x 3 x 3 mm grid, 16 x 32 x 32 voxels.
TRIAGE = {"spacing": [5, 3, 3], "patch_size": [16, 32, 32], "windows": ["blood"]}
#: Its training: 14 epochs; a left-right flip rather than the recipe's RandAffine, which on these few tiny
#: heads did not learn the bleed (the check of the training machinery in tests/triage/test_triage.py uses the same).
TRIAGE_TRAIN = {"max_epochs": 14, "batch_size": 4, "learning_rate": 0.0005, "flip_prob": 0.5, "affine_prob": 0.0}
#: The demo's segmentation grid (mm) and patch (voxels): the whole phantom torso in one patch.
SEG_SPACING, SEG_PATCH = [12, 12, 12], [32, 32, 32]
#: Epochs and learning rate of the demo's segmentation training.
SEG_EPOCHS, SEG_LR = 40, 0.002


def phantom_to_totalseg_map(structures: tuple[str, ...] = SEG_STRUCTURES) -> dict[str, int]:
    """Phantom label -> TotalSegmentator v2 index of ``structures``, for training the 118-class head on phantoms."""
    return {str(phantom.BODY_LABELS[name]): phantom.TOTALSEG_INDEX[name] for name in structures}


def build_steps(out: Path, data: dict[str, Path], init_filters: int) -> list[Step]:
    """The demo pipeline: pretrain -> segmentation -> triage -> retrieval, each step feeding the next."""
    ct = data["ct"]
    case = case_name(ct)
    small = {"init_filters": init_filters, "num_workers": 0}
    encoder = out / "pretrain" / "models" / "encoder.safetensors"  # every later step starts from it
    seg = out / "wholebody_seg"
    triage = out / "triage"
    pretrain = out / "pretrain"
    steps = [
        Step(
            "ctfm_pretrain: intra-sample contrastive pretraining of the encoder on the CT corpus",
            "ctfm_pretrain", ["train.json"], "training",
            dict(small, dataset_dir=str(data["corpus"].parent), datalist=str(data["corpus"]),
                 output_dir=str(pretrain), ckpt_dir=str(pretrain / "models"), patch_size=[16, 32, 32], num_crops=3,
                 batch_size=1, max_epochs=1, epoch_length=4, checkpoint_interval=4, warmup_epochs=0),
            {"pretrained encoder": encoder},
        ),
        Step(
            "ctfm_wholebody_seg: fine-tune SegResNetDS from the pretrained encoder on phantom labels",
            "ctfm_wholebody_seg", ["train.json"], "training",
            dict(small, dataset_dir=str(data["body"].parent), datalist=str(data["body"]), encoder_ckpt=str(encoder),
                 output_dir=str(seg / "train"), ckpt_dir=str(seg / "models"), label_map=phantom_to_totalseg_map(), num_classes=118,
                 spacing=SEG_SPACING, patch_size=SEG_PATCH, max_epochs=SEG_EPOCHS, val_interval=5,
                 learning_rate=SEG_LR, train_dice=False, batch_size=1, cache_rate=1.0),
            {"segmentation model": seg / "models" / "model.pt"},
        ),
        Step(
            "ctfm_wholebody_seg: Dice on held-out body phantoms",
            "ctfm_wholebody_seg", ["train.json", "evaluate.json"], "run",
            dict(small, dataset_dir=str(data["heldout_body"].parent), datalist=str(data["heldout_body"]),
                 output_dir=str(seg / "eval"), ckpt=str(seg / "models" / "model.pt"), label_map=phantom_to_totalseg_map(),
                 num_classes=118, spacing=SEG_SPACING, patch_size=SEG_PATCH, sw_batch_size=1),
            {"segmentation Dice on held-out phantoms (JSON)": seg / "eval" / "metrics.json"},
        ),
        Step(
            f"ctfm_wholebody_seg: segment {case}",
            "ctfm_wholebody_seg", ["inference.json"], "run",
            dict(input=str(ct), output_dir=str(seg / "inference"), ckpt=str(seg / "models" / "model.pt"),
                 init_filters=init_filters, spacing=SEG_SPACING, patch_size=SEG_PATCH, sw_batch_size=1, overlap=0.25),
            {"segmentation (NIfTI)": seg / "inference" / case / f"{case}_seg.nii.gz",
             "segmentation preview (PNG)": seg / "inference" / case / f"{case}_preview.png",
             "structure volumes (CSV)": seg / "inference" / case / f"{case}_structures.csv"},
        ),
        Step(
            "ctfm_triage: train the head-CT triage classifier from the pretrained encoder",
            "ctfm_triage", ["train.json"], "training",
            dict(small, **TRIAGE, dataset_dir=str(data["head"].parent), datalist=str(data["head"]),
                 encoder_ckpt=str(encoder), output_dir=str(triage / "train"), ckpt_dir=str(triage / "models"),
                 **TRIAGE_TRAIN),
            {"triage model": triage / "models" / "model.pt"},
        ),
        Step(
            "ctfm_triage: triage a held-out head phantom",
            "ctfm_triage", ["inference.json"], "run",
            dict(**TRIAGE, input=str(data["head_case"]), ckpt=str(triage / "models" / "model.pt"),
                 output_dir=str(triage / "pred"), init_filters=init_filters),
            {"triage predictions (CSV)": triage / "pred" / "predictions.csv"},
        ),
        Step(
            "ctfm_triage: AUC on held-out head phantoms (with/without a bleed)",
            "ctfm_triage", ["train.json", "evaluate.json"], "run",
            dict(small, **TRIAGE, dataset_dir=str(data["head"].parent), datalist=str(data["head"]), val_section="testing",
                 ckpt=str(triage / "models" / "model.pt"), output_dir=str(triage / "eval")),
            {"triage AUC on held-out phantoms (JSON)": triage / "eval" / "metrics.json"},
        ),
    ]
    retrieval = out / "retrieval"
    # the demo's small grid (the recipe is 3 x 1 x 1 mm, 24 x 128 x 128 patches: ~1 s a patch on a laptop CPU)
    embed = dict(small, encoder_ckpt=str(encoder), output_dir=str(retrieval), spacing=[6, 4, 4],
                 patch_size=[16, 64, 64], overlap=0)
    database = json.loads(data["database"].read_text())["testing"]
    steps += [
        Step(
            f"ctfm_retrieval: embed {case} and {len(database) - 1} phantoms",
            "ctfm_retrieval", ["embed.json"], "run", dict(embed, input=str(data["database"])),
            {"embeddings": retrieval / "embeddings" / "index.csv"},
        ),
        Step(
            "ctfm_retrieval: build the FAISS index",
            "ctfm_retrieval", ["index.json"], "run", dict(output_dir=str(retrieval)),
            {"vector index": retrieval / "index" / "index.faiss"},
        ),
        Step(
            f"ctfm_retrieval: the scans most similar to {case}",
            "ctfm_retrieval", ["embed.json", "query.json"], "run",
            dict({k: v for k, v in embed.items() if k != "num_workers"}, input=str(ct), k=5),
            {"nearest neighbours (CSV)": retrieval / "neighbours.csv"},
        ),
        Step(
            "ctfm_retrieval: precision@1 of body-vs-head retrieval among held-out phantoms",
            "ctfm_retrieval", ["evaluate.json"], "run",
            dict(index_dir=str(retrieval / "index"), output_dir=str(retrieval / "eval"),
                 labels=str(data["retrieval_labels"]), ks=[1, 3]),
            {"retrieval precision@k on held-out phantoms (JSON)": retrieval / "eval" / "retrieval_metrics.json"},
        ),
    ]
    return steps


def structure_fractions(datalist: Path, structures: tuple[str, ...] = SEG_STRUCTURES) -> dict[str, float]:
    """Mean fraction of the body (every labelled voxel) each structure fills in a datalist's labelled phantoms."""
    import nibabel as nib
    import numpy as np

    items = json.loads(datalist.read_text())["validation"]
    fractions: dict[str, list[float]] = {name: [] for name in structures}
    for item in items:
        labels = np.asarray(nib.load(datalist.parent / item["label"]).dataobj)
        body = max(int((labels > 0).sum()), 1)
        for name in structures:
            fractions[name].append(float((labels == phantom.BODY_LABELS[name]).sum()) / body)
    return {name: float(np.mean(v)) for name, v in fractions.items()}


def learning_summary(out: Path, data: dict[str, Path], user_ct: bool) -> dict:
    """The figures that show learning, all on held-out phantoms (never trained on), from the bundles' own reports.

    Segmentation: Dice per structure (ctfm_wholebody_seg evaluate.json) and its mean over the structures
    larger than 1% of the body; triage: AUC with its bootstrap 95% CI (ctfm_triage evaluate.json);
    retrieval: precision@1 of body-vs-head retrieval (ctfm_retrieval evaluate.json).
    """
    seg = json.loads((out / "wholebody_seg" / "eval" / "metrics.json").read_text())
    dice_of = {c["index"]: c["dice"] for c in seg["classes"]}
    fractions = structure_fractions(data["heldout_body"])
    structures = {name: {"totalsegmentator_index": phantom.TOTALSEG_INDEX[name],
                         "dice": float(dice_of.get(phantom.TOTALSEG_INDEX[name], 0.0)),
                         "body_fraction": round(fractions[name], 4)} for name in SEG_STRUCTURES}
    large = [v["dice"] for v in structures.values() if v["body_fraction"] > 0.01]
    auc = json.loads((out / "triage" / "eval" / "metrics.json").read_text())
    auc_label = next(iter(auc["labels"].values()))["metrics"]["auc"]
    retrieval = json.loads((out / "retrieval" / "eval" / "retrieval_metrics.json").read_text())
    summary = {
        "held_out": "phantoms with seeds of their own, used by no training step",
        "segmentation": {"cases": seg["num_cases"], "structures": structures,
                         "mean_dice_structures_over_1pct_of_body": float(sum(large) / max(len(large), 1))},
        "triage": {"cases": auc["num_cases"], "auc": auc_label["value"],
                   "auc_ci95": [auc_label["ci_low"], auc_label["ci_high"]]},
        "retrieval": {"queries": retrieval["num_queries"], "precision@1": retrieval["precision@1"]},
    }
    if user_ct:
        summary["your_ct"] = ("your CT has no labels here: Dice needs its label map (ctfm_wholebody_seg evaluate.json "
                              "with a datalist of image + label), AUC and precision@1 need class labels for a set of "
                              "scans (ctfm_triage / ctfm_retrieval evaluate.json); the figures above are on held-out "
                              "phantoms")
    return summary


def print_learning(summary: dict) -> None:
    seg, triage, retrieval = summary["segmentation"], summary["triage"], summary["retrieval"]
    print("\n[demo] Learning, on held-out phantoms (never trained on):")
    print(f"  segmentation Dice ({seg['cases']} held-out body phantoms):")
    for name, v in seg["structures"].items():
        print(f"    {name:<12} {v['dice']:.3f}  ({100 * v['body_fraction']:.1f}% of the body)")
    print(f"    mean over the structures larger than 1% of the body: {seg['mean_dice_structures_over_1pct_of_body']:.3f}")
    low, high = triage["auc_ci95"]
    print(f"  triage AUC ({triage['cases']} held-out head phantoms, with/without a bleed): {triage['auc']:.3f} "
          f"(95% CI {low:.3f}-{high:.3f})")
    print(f"  retrieval precision@1, body vs head ({retrieval['queries']} held-out phantoms): "
          f"{retrieval['precision@1']:.3f}")
    if "your_ct" in summary:
        print(f"  Your CT: {summary['your_ct']}.")


#: What the demo writes into its output folder, and the file that says the demo wrote it.
DEMO_OUTPUTS = ("data", "pretrain", "wholebody_seg", "triage", "retrieval", "logs", "summary.json")
DEMO_MARKER = ".ctfm_demo"


def start_afresh(out: Path) -> None:
    """Clear what an earlier demo run wrote into ``out``, so a rerun gives a first run's figures.

    Every training step resumes by default, and the retrieval index refuses embeddings of another
    encoder: an earlier run's checkpoints (another version, other settings) would be resumed and its
    database mixed in. The demo's own outputs (:data:`DEMO_OUTPUTS`) are removed only when ``out``
    holds :data:`DEMO_MARKER` (the demo wrote them); a folder that holds them without it is refused in
    one line, so nothing the demo did not write is ever deleted.
    """
    found = [name for name in DEMO_OUTPUTS if (out / name).exists()]
    if found and not (out / DEMO_MARKER).is_file():
        raise SystemExit(f"error: {out} already holds {', '.join(found)}, not written by this version of the demo: "
                         "pass another --output_dir, or remove them")
    if found:
        print(f"[demo] starting afresh in {out}: removing the earlier run's {', '.join(found)}")
    for name in found:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    atomic_write_text(out / DEMO_MARKER, "outputs of the ctfm-demo main job; a rerun replaces them\n")


def demo(*, ct: str | None = None, output_dir: str = "outputs/demo", init_filters: int = 8, seed: int = 0) -> dict:
    """Run every bundle end to end and print where the outputs are.

    Args:
        ct: your CT (NIfTI/NRRD file or DICOM series folder); default: a phantom CT.
        output_dir: where everything goes (created). A rerun into it starts afresh (:func:`start_afresh`).
        init_filters: encoder width for the demo's training runs (32 is the contract; 8 keeps
            the demo to minutes on a CPU).
        seed: seed of the phantoms and of the runs.

    Returns:
        The output paths by name.
    """
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    start_afresh(out)
    data = prepare_data(out, ct, seed)
    print(f"[demo] CT: {data['ct']} ({'yours' if ct else 'phantom'}); outputs in {out}")
    outputs: dict[str, Path] = {}
    for step in build_steps(out, data, init_filters):
        run_step(step, out / "logs")
        outputs.update(step.outputs)
    learning = learning_summary(out, data, user_ct=ct is not None)
    outputs["learning summary (JSON)"] = out / "summary.json"
    atomic_write_text(outputs["learning summary (JSON)"], json.dumps(learning, indent=2) + "\n")
    print_learning(learning)
    print(f"\n[demo] finished in {time.perf_counter() - start:.0f} s. Outputs:")
    width = max((len(k) for k in outputs), default=0)
    for name, path in outputs.items():
        print(f"  {name:<{width}}  {path}")
    print(
        f"\n[demo] The weights above were trained for a few iterations on phantoms at init_filters={init_filters}: "
        "they show every bundle running end to end and learning on phantoms they never saw (figures above), they are "
        "not models of real anatomy. For real use, pretrain on a CT corpus "
        "(tools/data/idc.py) or pass the public CT-FM weights as encoder_ckpt (see README)."
    )
    return {k: str(v) for k, v in outputs.items()}


def cli() -> None:
    """The console command (``[project.scripts]`` of pyproject.toml)."""
    fire.Fire(demo, serialize=lambda _: None)


if __name__ == "__main__":
    cli()
