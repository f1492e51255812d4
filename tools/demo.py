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
models. Each step's log is written beside its outputs.

Usage::

    python tools/demo.py                         # phantom CT
    python tools/demo.py --ct path/to/ct.nii.gz  # your CT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import fire

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tools"))
sys.path.insert(0, str(REPO_ROOT))

import phantom  # noqa: E402

from ctfm_common.inputs import case_name, resolve_input  # noqa: E402


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


def prepare_data(out: Path, ct: str | None, seed: int) -> dict[str, Path]:
    """Write the phantom corpora (and the phantom CT when the user gave none)."""
    data = out / "data"
    paths = {
        "body": Path(phantom.make_dataset(output_dir=str(data / "body"), num_cases=4, kind="body", seed=seed,
                                          shape=(64, 64, 48), spacing=(6.0, 6.0, 8.0))),
        "head": Path(phantom.make_dataset(output_dir=str(data / "head"), num_cases=8, kind="head", seed=seed,
                                          shape=(64, 64, 32), spacing=(3.0, 3.0, 5.0), lesion_fraction=0.5)),
    }
    paths["head_case"] = data / "head_test_lesion.nii.gz"
    phantom.write_head_phantom(output=str(paths["head_case"]), lesion=True, shape=(64, 64, 32), spacing=(3.0, 3.0, 5.0),
                               seed=seed + 2000)
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
    # the retrieval database: the CT and every phantom, body and head
    database = [{"image": str(paths["ct"])}]
    for kind in ("body", "head"):
        database += [{"image": str(p)} for p in sorted((paths[kind].parent / "imagesTr").glob("*.nii.gz"))]
    paths["database"] = data / "retrieval_database.json"
    paths["database"].write_text(json.dumps({"testing": database}, indent=2))
    return paths


def phantom_to_totalseg_map() -> dict[str, int]:
    """Phantom label -> TotalSegmentator v2 index, for training the 118-class head on phantoms."""
    return {str(phantom.BODY_LABELS[name]): index for name, index in phantom.TOTALSEG_INDEX.items()
            if name in phantom.BODY_LABELS and index > 0}


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
                 spacing=[6, 6, 6], patch_size=[32, 32, 32], max_epochs=2, batch_size=1),
            {"segmentation model": seg / "models" / "model.pt"},
        ),
        Step(
            f"ctfm_wholebody_seg: segment {case}",
            "ctfm_wholebody_seg", ["inference.json"], "run",
            dict(input=str(ct), output_dir=str(seg / "inference"), ckpt=str(seg / "models" / "model.pt"),
                 init_filters=init_filters, spacing=[3, 3, 3], patch_size=[64, 64, 64], sw_batch_size=1, overlap=0.25),
            {"segmentation (NIfTI)": seg / "inference" / case / f"{case}_seg.nii.gz",
             "segmentation preview (PNG)": seg / "inference" / case / f"{case}_preview.png",
             "structure volumes (CSV)": seg / "inference" / case / f"{case}_structures.csv"},
        ),
        Step(
            "ctfm_triage: train the head-CT triage classifier from the pretrained encoder",
            "ctfm_triage", ["train.json"], "training",
            dict(small, dataset_dir=str(data["head"].parent), datalist=str(data["head"]), encoder_ckpt=str(encoder),
                 output_dir=str(triage / "train"), ckpt_dir=str(triage / "models"), spacing=[5, 3, 3],
                 patch_size=[16, 32, 32], max_epochs=2, batch_size=2),
            {"triage model": triage / "models" / "model.pt"},
        ),
        Step(
            "ctfm_triage: triage a held-out head phantom",
            "ctfm_triage", ["inference.json"], "run",
            dict(input=str(data["head_case"]), ckpt=str(triage / "models" / "model.pt"), output_dir=str(triage / "pred"),
                 init_filters=init_filters, spacing=[5, 3, 3], patch_size=[16, 32, 32]),
            {"triage predictions (CSV)": triage / "pred" / "predictions.csv"},
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
    ]
    return steps


def demo(*, ct: str | None = None, output_dir: str = "outputs/demo", init_filters: int = 8, seed: int = 0) -> dict:
    """Run every bundle end to end and print where the outputs are.

    Args:
        ct: your CT (NIfTI/NRRD file or DICOM series folder); default: a phantom CT.
        output_dir: where everything goes (created).
        init_filters: encoder width for the demo's training runs (32 is the contract; 8 keeps
            the demo to minutes on a CPU).
        seed: seed of the phantoms and of the runs.

    Returns:
        The output paths by name.
    """
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = prepare_data(out, ct, seed)
    print(f"[demo] CT: {data['ct']} ({'yours' if ct else 'phantom'}); outputs in {out}")
    outputs: dict[str, Path] = {}
    for step in build_steps(out, data, init_filters):
        run_step(step, out / "logs")
        outputs.update(step.outputs)
    print(f"\n[demo] finished in {time.perf_counter() - start:.0f} s. Outputs:")
    width = max((len(k) for k in outputs), default=0)
    for name, path in outputs.items():
        print(f"  {name:<{width}}  {path}")
    print(
        f"\n[demo] The weights above were trained for a few iterations on phantoms at init_filters={init_filters}: "
        "they show every bundle running end to end, they are not models. For real use, pretrain on a CT corpus "
        "(tools/idc.py) or pass the public CT-FM weights as encoder_ckpt (see README)."
    )
    return {k: str(v) for k, v in outputs.items()}


if __name__ == "__main__":
    fire.Fire(demo, serialize=lambda _: None)
