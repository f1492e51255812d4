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
"""The bundle collection as a whole: layout, metadata, configs, the shared encoder contract."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BUNDLE_NAMES, BUNDLES_DIR, META_SCHEMA, REPO_ROOT
from monai.bundle import ConfigParser
from monai.networks.nets.segresnet_ds import SegResEncoder, SegResNetDS

from ctfm_bundles.tools import bundle_scripts_switch, use_bundle_scripts
from ctfm_bundles.tools.release import package_bundles as pb
from ctfm_common import encoder as enc

EXPECTED_BUNDLES = ["ctfm_pretrain", "ctfm_retrieval", "ctfm_triage", "ctfm_wholebody_seg"]


def config_files(bundle: str) -> list[Path]:
    return sorted(p for p in (BUNDLES_DIR / bundle / "configs").glob("*.json") if p.name != "metadata.json")


def config_sets(bundle: str) -> list[list[Path]]:
    """Config file lists as users run them: stand-alone files, and overrides after their base (package_bundles)."""
    return [[BUNDLES_DIR / bundle / name for name in names] for names in pb.config_sets(BUNDLES_DIR / bundle)]


def bundle_parser(bundle: str, files: list[Path], **overrides) -> ConfigParser:
    """Parse a bundle's configs in this process with its own ``scripts`` package importable."""
    use_bundle_scripts(BUNDLES_DIR / bundle)
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update(overrides)
    parser.parse()
    return parser


@pytest.fixture
def bundle_path_cleanup():
    with bundle_scripts_switch():
        yield


def test_layout_is_complete():
    assert BUNDLE_NAMES == EXPECTED_BUNDLES
    for top in ("README.md", "requirements.txt", ".ci/run", "tools", "tests", "ctfm_common"):
        assert (REPO_ROOT / top).exists(), top
    for bundle in BUNDLE_NAMES:
        root = BUNDLES_DIR / bundle
        for rel in ("configs/metadata.json", "configs/logging.conf", "docs/README.md", "LICENSE", "large_files.yml"):
            assert (root / rel).is_file(), f"{bundle}/{rel} missing"
        assert "Apache License" in (root / "LICENSE").read_text()
        assert isinstance(yaml.safe_load((root / "large_files.yml").read_text()), dict)


@pytest.mark.parametrize("bundle", EXPECTED_BUNDLES)
def test_metadata_verifies_against_schema(bundle):
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json",
         "--filepath", str(META_SCHEMA)],
        cwd=BUNDLES_DIR / bundle, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "metadata is verified with no error" in proc.stdout + proc.stderr
    meta = json.loads((BUNDLES_DIR / bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"], "the current version needs a changelog entry"
    assert "SPL" in json.dumps(meta["network_data_format"]) and "[-1024, 2048]" in json.dumps(meta["network_data_format"])


@pytest.mark.parametrize("bundle", EXPECTED_BUNDLES)
def test_logging_conf_passes_monai_allowlist(bundle):
    from monai.bundle.workflows import _reject_executable_logging_config

    assert "[handlers]" in _reject_executable_logging_config(str(BUNDLES_DIR / bundle / "configs" / "logging.conf"))


@pytest.mark.parametrize("bundle", EXPECTED_BUNDLES)
def test_configs_parse_and_network_builds(bundle, bundle_path_cleanup):
    sets = config_sets(bundle)
    assert sets, f"{bundle} has no workflow config"
    built = 0
    for files in sets:
        raw = ConfigParser.load_config_files([str(f) for f in files])
        if len(files) == 2 and files[0].name == "train.json":  # a variant may only change ids train.json has
            base = ConfigParser(ConfigParser.load_config_file(str(files[0])))
            missing = [k for k in ConfigParser.load_config_file(str(files[1])) if k not in base and not k.startswith("_")]
            assert not missing, f"{files[1].name} overrides ids absent from train.json: {missing}"
        text = json.dumps(raw)
        assert "%" not in text.replace("%(", ""), f"{files}: '%file::id' macros break downloaded bundles"
        assert "initialize" not in raw, f"{files}: 'initialize' would resolve before monai.bundle puts scripts on sys.path"
        if "network_def" not in raw:
            continue
        parser = bundle_parser(bundle, files, init_filters=8)
        net = parser.get_parsed_content("network_def")
        assert isinstance(net, torch.nn.Module)
        enc.encoder_of(net)  # holds the shared encoder
        assert Path(parser.get_parsed_content("bundle_root")) == BUNDLES_DIR / bundle
        built += 1
    assert built, f"no config of {bundle} defines network_def"


@pytest.mark.parametrize("bundle", EXPECTED_BUNDLES)
def test_every_bundle_declares_the_contract_encoder(bundle, bundle_path_cleanup):
    files = next(f for f in config_sets(bundle) if "network_def" in ConfigParser.load_config_files([str(x) for x in f]))
    parser = bundle_parser(bundle, files)
    assert parser.get_parsed_content("init_filters") == 32, "the contract's width is the default"
    encoder, _ = enc.encoder_of(parser.get_parsed_content("network_def"))
    reference = SegResEncoder(**enc.ENCODER_ARGS).state_dict()
    got = encoder.state_dict()
    assert list(got) == list(reference)
    assert all(got[k].shape == reference[k].shape for k in reference)
    assert sum(p.numel() for p in encoder.parameters()) == 77_760_992


class NotATensor:
    """An arbitrary class: a pickle referencing it must be refused by ``weights_only=True``."""


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    from huggingface_hub import PyTorchModelHubMixin

    class CTFMFeatureExtractor(SegResEncoder, PyTorchModelHubMixin):
        pass

    torch.manual_seed(0)
    model = CTFMFeatureExtractor(spatial_dims=3, in_channels=1, init_filters=8, blocks_down=(1, 2, 2, 4, 4))
    folder = tmp_path_factory.mktemp("hub") / "ct_fm_feature_extractor"
    model.save_pretrained(folder, config={"spatial_dims": 3, "in_channels": 1, "init_filters": 8, "blocks_down": [1, 2, 2, 4, 4]})
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    return folder, model.state_dict()


@pytest.mark.parametrize("bundle", EXPECTED_BUNDLES)
def test_hub_mixin_weights_load_into_every_bundle_network(bundle, hub_folder, bundle_path_cleanup):
    folder, reference = hub_folder
    files = next(f for f in config_sets(bundle) if "network_def" in ConfigParser.load_config_files([str(x) for x in f]))
    parser = bundle_parser(bundle, files, init_filters=8)
    net = parser.get_parsed_content("network_def")
    bundle_encoder_module = sys.modules["scripts.ctfm_common.encoder"]  # the bundle's own packaged copy
    assert Path(bundle_encoder_module.__file__).is_relative_to(BUNDLES_DIR / bundle)
    report = bundle_encoder_module.load_encoder_weights(net, folder)
    assert report.missing == [] and report.mismatched == []
    assert len(report.loaded) == len(reference)
    encoder, _ = enc.encoder_of(net)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_weights_round_trip_safetensors_torch_and_segresnetds(tmp_path):
    torch.manual_seed(1)
    seg = SegResNetDS(init_filters=8, blocks_down=(1, 2, 2, 4, 4), out_channels=3, dsdepth=4)
    # a whole SegResNetDS checkpoint (Ignite-style container) feeds a bare encoder
    torch.save({"network": seg.state_dict(), "epoch": 3}, tmp_path / "seg.pt")
    bare = enc.build_encoder(init_filters=8)
    report = enc.load_encoder_weights(bare, tmp_path / "seg.pt")
    assert report.source_prefix == "encoder." and report.target_prefix == ""
    assert any(k.startswith("up_layers") for k in report.unexpected)  # decoder keys are reported, not loaded
    assert torch.equal(bare.conv_init.weight, seg.encoder.conv_init.weight)
    # the exported .safetensors has bare keys and loads into the encoder part of a new SegResNetDS
    path = enc.save_encoder_weights(bare, tmp_path / "encoder.safetensors", metadata={"init_filters": 8})
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == set(enc.build_encoder(init_filters=8).state_dict())
    seg2 = SegResNetDS(init_filters=8, blocks_down=(1, 2, 2, 4, 4), out_channels=118, dsdepth=4)
    report = enc.load_encoder_weights(seg2, path)
    assert report.target_prefix == "encoder." and not report.missing and not report.unexpected
    assert torch.equal(seg2.encoder.conv_init.weight, seg.encoder.conv_init.weight)
    # the pooled embedding network: 8 filters -> 128-d embedding, head output as asked
    head = enc.PooledEncoderHead(init_filters=8, out_features=3)
    enc.load_encoder_weights(head, path)
    assert head(torch.zeros(2, 1, 32, 32, 32)).shape == (2, 3)
    assert head.embed(torch.zeros(1, 1, 32, 32, 32)).shape == (1, enc.embedding_dim(8)) == (1, 128)


def test_bad_weight_files_give_clear_errors(tmp_path):
    good = enc.save_encoder_weights(enc.build_encoder(init_filters=8), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(enc.EncoderWeightsError, match="truncated.safetensors.*not a readable .safetensors"):
        enc.load_encoder_weights(enc.build_encoder(init_filters=8), truncated)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(enc.EncoderWeightsError, match="empty.pt.*empty"):
        enc.read_state_dict(empty)
    # wider encoder than the weights: every mismatched key is named, and nothing is loaded
    wide = enc.build_encoder(init_filters=16)
    before = wide.conv_init.weight.clone()
    with pytest.raises(enc.EncoderWeightsError, match=r"shape mismatch \(\d+\): conv_init.weight file \(8, 1, 3, 3, 3\)"):
        enc.load_encoder_weights(wide, good)
    assert torch.equal(wide.conv_init.weight, before)
    # weights of something else entirely
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(enc.EncoderWeightsError, match="no encoder weights found"):
        enc.load_encoder_weights(enc.build_encoder(init_filters=8), tmp_path / "other.pt")
    # a pickle holding arbitrary objects is refused by weights_only=True
    torch.save({"weights": torch.zeros(1), "obj": NotATensor}, tmp_path / "pickled.pt")
    with pytest.raises(enc.EncoderWeightsError, match="weights_only=True"):
        enc.read_state_dict(tmp_path / "pickled.pt")
    with pytest.raises(enc.WeightsNotFoundError, match="encoder weights not found: .*nowhere.*ct_fm_feature_extractor"):
        enc.read_state_dict(tmp_path / "nowhere" / "x.safetensors")
    # strict=False loads what matches and reports the rest
    partial = {k: v for k, v in load_state(good).items() if not k.startswith("layers.4")}
    report = enc.load_encoder_weights(enc.build_encoder(init_filters=8), partial, strict=False)
    assert report.missing and all(k.startswith("layers.4") for k in report.missing)
    assert "missing in the file" in str(report)


def test_full_model_weights_load_strictly_with_the_one_line_report(tmp_path, caplog):
    """``load_model_weights``, the route of every evaluate/inference config: a training checkpoint
    (``{"model": ..., "optimizer": ...}``), a ``module.``-prefixed DDP state dict and a .safetensors file
    load into the (DDP-unwrapped) network with one log line; weights of another width and a missing
    file are one-line errors naming the settings / the commands that get weights."""
    torch.manual_seed(3)
    trained = SegResNetDS(init_filters=8, blocks_down=(1, 2, 2, 4, 4), out_channels=3, dsdepth=4)
    state = trained.state_dict()
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "trainer": {"epoch": 2}},
               tmp_path / "last.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    for name in ("last.pt", "ddp.pt", "model.safetensors"):
        network = SegResNetDS(init_filters=8, blocks_down=(1, 2, 2, 4, 4), out_channels=3, dsdepth=4)
        caplog.clear()
        with caplog.at_level("INFO"):
            assert enc.load_model_weights(network, tmp_path / name, what="test model weights") is network
        for key, value in network.state_dict().items():
            assert torch.equal(value, state[key]), (name, key)
        lines = [r.getMessage() for r in caplog.records if "tensors loaded" in r.getMessage()]
        assert len(lines) == 1 and "\n" not in lines[0], lines
        assert lines[0].startswith(f"test model weights from {tmp_path / name}: {len(state)} tensors loaded")
    # the DDP / DataParallel unwrap is the shared one
    wrapped = torch.nn.DataParallel(SegResNetDS(init_filters=8, blocks_down=(1, 2, 2, 4, 4), out_channels=3, dsdepth=4))
    enc.load_model_weights(wrapped, tmp_path / "ddp.pt")
    assert torch.equal(enc.unwrap(wrapped).encoder.conv_init.weight, trained.encoder.conv_init.weight)
    # another number of classes: one line naming the file, the mismatched key and the settings to check
    other = SegResNetDS(init_filters=8, blocks_down=(1, 2, 2, 4, 4), out_channels=5, dsdepth=4)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(enc.EncoderWeightsError) as caught:
        enc.load_model_weights(other, tmp_path / "last.pt", settings="init_filters, num_classes")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'last.pt'}: does not match the network "
                                                       "(init_filters, num_classes?)")
    assert "shape mismatch" in message and "file (3, " in message
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # left untouched
    from ctfm_common.runtime import user_error_line

    assert user_error_line(caught.value) == message  # monai.bundle run prints it as one line
    with pytest.raises(enc.WeightsNotFoundError) as missing:
        enc.load_model_weights(other, tmp_path / "none.pt", what="whole-body model weights",
                               release="project-lighter/whole_body_segmentation")
    assert str(missing.value).startswith(f"whole-body model weights not found: {tmp_path / 'none.pt'}")
    assert "project-lighter/whole_body_segmentation" in str(missing.value) and "\n" not in str(missing.value)
    # an empty ckpt keeps the random init, loudly
    with caplog.at_level("WARNING"):
        enc.load_model_weights(other, "")
    assert "RANDOM initialisation" in caplog.text


def test_encoder_route_warns_on_random_init_and_reports_in_one_line(tmp_path, caplog):
    """``load_encoder``, the route of every train/embed config: empty = a warning (information where random
    init is the usual start), otherwise the strict load and its one-line report."""
    weights = enc.save_encoder_weights(enc.build_encoder(init_filters=8), tmp_path / "encoder.safetensors")
    with caplog.at_level("INFO"):
        enc.load_encoder(enc.PooledEncoderHead(init_filters=8), "", random_init_ok=True)
    assert "random initialisation" in caplog.text and not [r for r in caplog.records if r.levelname == "WARNING"]
    caplog.clear()
    with caplog.at_level("INFO"):
        enc.load_encoder(SegResNetDS(init_filters=8, blocks_down=(1, 2, 2, 4, 4), out_channels=3, dsdepth=4), weights)
    lines = [r.getMessage() for r in caplog.records if "tensors loaded" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith(f"encoder weights from {weights}: ") and "into 'encoder.'" in lines[0]
    with pytest.raises(enc.EncoderWeightsError) as caught:
        enc.load_encoder(enc.build_encoder(init_filters=16), weights)
    assert "\n" not in str(caught.value) and "does not match the shared encoder" in str(caught.value)


def load_state(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_repo_id_offline_says_how_to_pass_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(enc.EncoderWeightsError, match="pass the local folder or its model.safetensors"):
        enc.read_state_dict("project-lighter/ct_fm_feature_extractor", cache_dir=str(tmp_path))


def test_repo_id_resolves_from_the_local_hub_cache(tmp_path, monkeypatch, hub_folder):
    """A repo downloaded once (here: placed in the cache by huggingface_hub's own layout) loads offline."""
    folder, reference = hub_folder
    repo = "project-lighter/ct_fm_feature_extractor"
    snapshot = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = enc.read_state_dict(repo, cache_dir=str(tmp_path))
    assert set(state) == set(reference)


def test_shared_code_copies_are_in_sync():
    from ctfm_bundles.tools.release import sync_bundles

    assert sync_bundles.stale_copies() == []
    for bundle in BUNDLE_NAMES:
        copy = BUNDLES_DIR / bundle / "scripts" / "ctfm_common" / "encoder.py"
        assert copy.read_text().startswith("# GENERATED from ctfm_common/encoder.py")


def test_sync_detects_and_repairs_drift(tmp_path):
    from ctfm_bundles.tools.release import sync_bundles

    source = tmp_path / "ctfm_common"
    shutil.copytree(REPO_ROOT / "ctfm_common", source, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "bundles" / "b" / "configs").mkdir(parents=True)
    (tmp_path / "bundles" / "b" / "configs" / "metadata.json").write_text("{}")
    (tmp_path / "bundles" / "b" / "scripts").mkdir()
    (tmp_path / "bundles" / "b" / "scripts" / "model.py").write_text("from .ctfm_common.encoder import build_encoder\n")
    # the bundle gets what it imports and what that imports in turn, nothing else
    used = sync_bundles.used_modules(tmp_path / "bundles" / "b", source)
    assert "encoder" in used and "download" in used and "cases" not in used
    stale = sync_bundles.stale_copies(source, tmp_path / "bundles")
    assert {p.name for p in stale} == {f"{m}.py" for m in used} | {"__init__.py"}  # nothing packaged yet
    for path, text in sync_bundles.expected_copies(source, tmp_path / "bundles").items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert sync_bundles.stale_copies(source, tmp_path / "bundles") == []
    (source / "encoder.py").write_text((source / "encoder.py").read_text() + "\n# changed\n")
    assert [p.name for p in sync_bundles.stale_copies(source, tmp_path / "bundles")] == ["encoder.py"]
    unused = tmp_path / "bundles" / "b" / "scripts" / "ctfm_common" / "cases.py"  # left from an earlier sync
    unused.write_text(sync_bundles.STAMP.format(name="cases.py") + (source / "cases.py").read_text())
    assert unused in sync_bundles.stale_copies(source, tmp_path / "bundles")


@pytest.mark.parametrize("bundle", EXPECTED_BUNDLES)
def test_bundle_copied_alone_builds_its_network(bundle, tmp_path):
    """The zoo and MONAI Label copy one bundle folder: nothing may point outside it."""
    copy = tmp_path / bundle
    shutil.copytree(BUNDLES_DIR / bundle, copy, ignore=shutil.ignore_patterns("__pycache__", "eval", "*.safetensors", "*.pt"))
    files = next(f for f in config_sets(bundle) if "network_def" in ConfigParser.load_config_files([str(x) for x in f]))
    names = json.dumps([str(copy / "configs" / f.name) for f in files])
    code = pb.HIDE_REPOSITORY_PACKAGES + (  # as after a zoo download: the repository's packages are not there
        "import sys, json; from monai.bundle import ConfigParser; p = ConfigParser(); "
        f"p.read_config(json.loads({names!r})); p['init_filters'] = 8; p.parse(); "
        "net = p.get_parsed_content('network_def'); import scripts; "
        "print('ROOT=' + p.get_parsed_content('bundle_root')); print('FILE=' + scripts.encoder.__file__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=copy, capture_output=True, text=True, timeout=300,
                          env={"PATH": "", "PYTHONPATH": "", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ROOT={copy}" in proc.stdout
    assert f"FILE={copy}" in proc.stdout
    # and no module, run or not, imports them (a bundle imports its own copy: .ctfm_common / scripts.ctfm_common)
    outside = [str(f.relative_to(copy)) for f in copy.rglob("*.py")
               if re.search(r"^\s*(from|import) (ctfm_bundles|ctfm_common|tools)\b", f.read_text(), re.M)]
    assert outside == [], f"{bundle}: bundle code imports the repository's packages: {outside}"


def test_project_carries_what_its_checks_need_and_never_reads_shared():
    """A fresh clone has nothing beside it: the metadata schema is carried, no tool or bundle reads ../shared."""
    from ctfm_bundles.tools.release import package_bundles as pb

    assert META_SCHEMA.is_file() and META_SCHEMA.is_relative_to(REPO_ROOT)
    assert pb.META_SCHEMA == META_SCHEMA
    assert "meta_schema" in (META_SCHEMA.parent / "README.md").read_text()  # source URL and licence noted
    readers = []
    for path in [*(REPO_ROOT / "tools").rglob("*.py"), *(REPO_ROOT / "tools").rglob("*.sh"), *BUNDLES_DIR.rglob("*.py"),
                 *BUNDLES_DIR.rglob("*.json"), *(REPO_ROOT / "ctfm_common").glob("*.py")]:
        text = path.read_text()
        if "../shared" in text or '/ "shared"' in text:
            readers.append(str(path.relative_to(REPO_ROOT)))
    assert readers == []


def _device_expressions(parser: ConfigParser) -> dict[str, str]:
    """Ids whose expression depends on ``device`` only through ids that depend on nothing else:
    the spelling-sensitive ones (``.type``, ``torch.device(...)``, conditions on them)."""
    import re

    def refs(raw) -> set[str]:
        return set(re.findall(r"@([\w#]+)", json.dumps(raw))) if raw is not None else set()

    def device_only(name: str, depth: int = 0) -> bool:
        found = refs(parser.get(name))
        return depth < 4 and bool(found) and all(r == "device" or device_only(r, depth + 1) for r in found)

    out = {}
    stack = [("", parser.get(""))]
    while stack:
        prefix, node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            name = f"{prefix}#{key}" if prefix else str(key)
            if isinstance(value, str) and value.startswith("$") and "@device" in value and device_only(name):
                out[name] = value
            stack.append((name, value))
    return out


@pytest.mark.parametrize("bundle", EXPECTED_BUNDLES)
def test_every_config_accepts_each_device_spelling(bundle, bundle_path_cleanup):
    """``--device cpu`` / ``cuda`` / ``cuda:1`` (strings, as the CLI passes them) resolve in every config."""
    checked = 0
    for files in config_sets(bundle):
        for spelling in ("cpu", "cuda", "cuda:1"):
            parser = bundle_parser(bundle, files, device=spelling)
            for name, expression in _device_expressions(parser).items():
                if spelling != "cpu" and any(call in expression for call in ("set_device", "torch.cuda", "scripts.")):
                    continue  # asks the GPU itself, not just the spelling
                try:
                    parser.get_parsed_content(name, instantiate=False)
                except Exception as e:  # noqa: BLE001 - the failure names the config, id and spelling
                    raise AssertionError(f"{[f.name for f in files]}::{name} with device={spelling!r}: {e}") from e
                checked += 1
    assert checked > 0 or bundle == "ctfm_retrieval"  # its configs hand `device` to torch.device in scripts/


RUN_LISTS = ("initialize", "training", "run", "finalize")


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_override_files_override_ids_and_never_retype_a_run_list(bundle):
    """A config merged after a base (multi_gpu_train.json, evaluate.json, the retrieval variants) never
    redefines the base's run lists; a multi-GPU file only overrides ids its base has, so the multi-GPU
    run is the single-device run line for line (seg: the resume keeps the longer schedule)."""
    from monai.bundle import ConfigParser

    from ctfm_bundles.tools.release import package_bundles as pb

    bundle_dir = BUNDLES_DIR / bundle
    for names in pb.config_sets(bundle_dir):
        if len(names) == 1:
            own = ConfigParser.load_config_file(str(bundle_dir / names[0]))
            if "training" in own:  # a base train config: `run` is the training run, not a copy of it
                assert own.get("run") == "@training", (bundle, names, own.get("run"))
            continue
        base = ConfigParser.load_config_file(str(bundle_dir / names[0]))
        own = ConfigParser.load_config_file(str(bundle_dir / names[1]))
        retyped = [i for i in RUN_LISTS if i in own and i in base and own[i] != base[i] and i != "run"]
        assert not retyped, f"{bundle}/{names[1]} redefines the run list(s) {retyped} of {names[0]}"
        if names[1] == "configs/multi_gpu_train.json":
            assert not set(own) & set(RUN_LISTS), f"{bundle}/{names[1]} redefines {set(own) & set(RUN_LISTS)}"
            unknown = sorted(set(own) - set(base))
            assert not unknown, f"{bundle}/{names[1]} names ids its base config lacks: {unknown}"
            merged = ConfigParser.load_config_files([str(bundle_dir / n) for n in names])
            assert merged["training"] == base["training"] and merged["run"] == "@training"
            assert any("set_determinism(seed=@seed + @rank)" in step for step in merged["training"])
            if bundle == "ctfm_wholebody_seg":
                assert any("keep_schedule_length" in step for step in merged["training"])


def test_one_freeze_schedule_for_every_bundle():
    """``FreezeEncoder`` (seg and triage ``freeze_encoder_epochs``): N > 0 frozen for epochs 1..N then trained,
    negative frozen throughout, 0 not attached; frozen weights get no gradient, and batch-norm statistics stay
    those of the loaded weights unless ``update_batch_norm`` (the segmentation bundle's choice)."""
    from ignite.engine import Engine

    for update_batch_norm in (False, True):
        torch.manual_seed(0)
        network = SegResNetDS(init_filters=8, blocks_down=(1, 2, 2, 4, 4), out_channels=3, dsdepth=4)
        before = {k: v.clone() for k, v in network.encoder.state_dict().items()}
        engine = Engine(lambda e, b: None)
        handler = enc.FreezeEncoder(torch.nn.DataParallel(network), epochs=1, update_batch_norm=update_batch_norm)
        handler.attach(engine)
        engine.state.epoch = 1
        handler(engine)
        network.train()  # what the trainer calls every iteration
        optimizer = torch.optim.SGD([p for p in network.parameters() if p.requires_grad], lr=0.1)
        network(torch.rand(2, 1, 16, 16, 16))[0].sum().backward()
        optimizer.step()
        after = network.encoder.state_dict()
        weights = [k for k in before if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        statistics = [k for k in before if k.endswith("running_mean")]
        assert all(torch.equal(after[k], before[k]) for k in weights)
        assert all(torch.equal(after[k], before[k]) for k in statistics) != update_batch_norm
        assert network.encoder.training == update_batch_norm
        engine.state.epoch = 2
        handler(engine)
        assert network.encoder.training and all(p.requires_grad for p in network.encoder.parameters())
    probe = enc.FreezeEncoder(enc.build_encoder(init_filters=8), epochs=-1)
    engine.state.epoch = 50
    probe(engine)
    assert not any(p.requires_grad for p in probe.encoder.parameters())
    idle, engine = enc.FreezeEncoder(enc.build_encoder(init_filters=8), epochs=0), Engine(lambda e, b: None)
    idle.attach(engine)
    assert not engine.has_event_handler(idle)


# --- one vocabulary across bundles ----------------------------------------------------------------------------
#: The ids that mean the same thing in every bundle (DESIGN.md's common ids and the training ones), with the
#: kind of value each holds once parsed.
COMMON_IDS: dict[str, type | tuple[type, ...]] = {
    "input": str, "output_dir": str, "dataset_dir": str, "encoder_ckpt": str, "ckpt": str, "ckpt_dir": str,
    "init_filters": int, "max_epochs": int, "batch_size": int, "num_workers": int, "amp": bool,
    "device": (str, torch.device), "seed": int, "rank": int, "resume": bool, "is_main_process": bool,
    "last_ckpt": str, "patch_size": (list, tuple),
}
#: Names that other code bases use for those things: none may appear as a config id.
SYNONYMS = {
    "main_process": "is_main_process", "is_main": "is_main_process", "best_saver": "best_checkpoint_saver",
    "last_saver": "last_checkpoint_saver", "model_last": "last_ckpt", "last_checkpoint": "last_ckpt",
    "roi_size": "patch_size", "roi": "patch_size", "crop_size": "patch_size", "window_size": "patch_size",
    "checkpoint_dir": "ckpt_dir", "output_folder": "output_dir", "data_dir": "dataset_dir", "data_list": "datalist",
    "num_epochs": "max_epochs", "epochs": "max_epochs", "workers": "num_workers", "use_amp": "amp",
    "filters": "init_filters", "random_seed": "seed", "weights": "ckpt", "encoder_weights": "encoder_ckpt",
    "pretrained": "encoder_ckpt", "local_rank": "rank",
}
#: Old ids still accepted from the command line (a documented command used them): null, read only by the new id.
DEPRECATED_ALIASES = {"roi_size": "patch_size"}
#: What the removed weight routes looked like: every config now calls scripts.encoder.load_encoder /
#: load_model_weights.
REMOVED_ROUTES = ("load_pretrained_encoder", "load_encoder_or_warn", "load_network_weights", "model.load_checkpoint",
                  "if @encoder_ckpt else", "$@encoder_ckpt and")


@pytest.mark.parametrize("bundle", EXPECTED_BUNDLES)
def test_common_ids_have_one_name_and_one_meaning_in_every_bundle(bundle, bundle_path_cleanup):
    """Every config set of every bundle (overrides merged after their base): no synonym of a common id, each
    common id holds the same kind of value, the same seeding and weight routes in every train config."""
    for files in config_sets(bundle):
        where = " + ".join(f.name for f in files)
        raw: dict = {}
        for f in files:
            raw.update(json.loads(f.read_text()))
        text = json.dumps(raw)
        for old in REMOVED_ROUTES:
            assert old not in text, f"{bundle} {where}: loads weights through {old!r}"
        for name in raw:
            if name in DEPRECATED_ALIASES:
                new = DEPRECATED_ALIASES[name]
                assert raw[name] is None and f"@{name}" in str(raw.get(new)), \
                    f"{bundle} {where}: deprecated '{name}' must be null and read by '{new}' only"
            else:
                assert name not in SYNONYMS, f"{bundle} {where}: '{name}' is a synonym of '{SYNONYMS.get(name)}'"
        parser = bundle_parser(bundle, files)
        for name, kind in COMMON_IDS.items():
            if name not in raw or any(s in str(raw[name]) for s in ("dist.", "os.environ")):
                continue  # torchrun's values exist only under torchrun
            value = parser.get_parsed_content(name)
            assert isinstance(value, kind) and not (kind is int and isinstance(value, bool)), \
                f"{bundle} {where}: '{name}' = {value!r}, expected {kind}"
        if "last_ckpt" in raw:
            assert parser.get_parsed_content("last_ckpt").endswith("/last.pt")
            assert raw["last_checkpoint_saver"]["last_filename"] == "$os.path.basename(@last_ckpt)"
            assert raw["resume_loader"]["load_path"] == "@resume_ckpt"
        if "best_checkpoint_saver" in raw:
            assert raw["best_checkpoint_saver"]["save_key_metric"] is True
        if "training" in raw:
            training = raw["training"]
            assert training[:2] == ["$@setup_distributed", "$monai.utils.set_determinism(seed=@seed + @rank)"], where
            assert any(str(step).startswith("$scripts.encoder.load_encoder(") for step in training), where
        if "ckpt" in raw and "training" not in raw and bundle != "ctfm_pretrain":
            assert "scripts.encoder.load_model_weights(@network, @ckpt" in text, where


@pytest.mark.parametrize("bundle, files, default", [
    ("ctfm_triage", ["train.json"], [48, 128, 128]),
    ("ctfm_triage", ["inference.json"], [48, 128, 128]),
    ("ctfm_wholebody_seg", ["inference.json"], [96, 160, 160]),
])
def test_the_renamed_roi_size_still_sets_the_patch_size(bundle, files, default, bundle_path_cleanup):
    """``--roi_size`` (documented before it was renamed ``patch_size``) keeps working; ``--patch_size`` too."""
    paths = [BUNDLES_DIR / bundle / "configs" / f for f in files]
    assert bundle_parser(bundle, paths).get_parsed_content("patch_size") == default
    assert bundle_parser(bundle, paths, roi_size=[16, 32, 32]).get_parsed_content("patch_size") == [16, 32, 32]
    assert bundle_parser(bundle, paths, patch_size=[8, 16, 16]).get_parsed_content("patch_size") == [8, 16, 16]
