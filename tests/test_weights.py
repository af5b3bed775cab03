"""zoo.weights: safe reading, validation against the variant, conversion and loading.

References are independent of the code under test: safetensors' own reader, hashlib, hand-written
expected messages and the shapes of spec §2.2.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zoo.model import ISANet
from zoo.registry import get_config
from zoo.reader import CheckpointError, UnsafeCheckpointError, read_state_dict
from zoo.weights import CLASSIFIER_KEYS, convert_checkpoint, load_weights

CITYSCAPES = "isanet_r50-d8_512x1024_40k_cityscapes"
ADE = "isanet_r50-d8_512x512_80k_ade20k"
CLASSES_19 = tuple(f"class{i}" for i in range(19))


def _model(num_classes=None, seed=0):
    torch.manual_seed(seed)
    return ISANet(get_config(CITYSCAPES), num_classes=num_classes)


@pytest.fixture(autouse=True)
def _free_disk(tmp_path):
    """Converted R-50 files are 150 MB each; pytest keeps the last 3 runs' tmp dirs otherwise."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def state():
    """A random R-50 Cityscapes state_dict; BN counters above int32 range to prove int64 survives."""
    sd = _model(seed=1).state_dict()
    for i, key in enumerate(k for k in sd if k.endswith("num_batches_tracked")):
        sd[key] = torch.tensor(2**40 + i, dtype=torch.int64)
    return sd


@pytest.fixture(scope="module")
def light(state):
    """`state` with each tensor one stored value broadcast to its shape: same layout, ~130 kB as .pth."""
    return {k: v.reshape(-1)[:1].clone().reshape(()).expand(v.shape) for k, v in state.items()}


@pytest.fixture(scope="module")
def mmseg_pth(state, tmp_path_factory):
    """An MMSeg-style checkpoint: meta with numpy scalars, DataParallel `module.` prefixes."""
    path = tmp_path_factory.mktemp("ckpt") / "isanet_cityscapes_mmseg.pth"
    meta = {"seed": np.int64(1234), "best_mIoU": np.float64(0.7849), "CLASSES": CLASSES_19,
            "PALETTE": [[128, 64, 128]] * 19, "mmseg_version": "0.17.0+abc1234", "config": "model = dict()"}
    torch.save({"meta": meta, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    yield path
    path.unlink()


def _save_pth(sd, path):
    torch.save({"meta": {"config": ""}, "state_dict": sd}, path)
    return path


# ------------------------------------------------------------------------------ conversion


def test_convert_roundtrips_every_tensor_and_records_metadata(state, mmseg_pth, tmp_path):
    dst = convert_checkpoint(mmseg_pth, tmp_path / "out.safetensors", CITYSCAPES)
    assert dst == tmp_path / "out.safetensors"
    loaded = load_file(dst)  # safetensors' own reader, not ours
    assert sorted(loaded) == sorted(state)  # safetensors stores keys sorted, not in model order
    assert len(loaded) == 416  # spec §2.2: R-50 has 416 keys
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key
    nbt = [k for k in state if k.endswith("num_batches_tracked")]
    assert len(nbt) == 68 and all(loaded[k].dtype == torch.int64 and loaded[k].dim() == 0 for k in nbt)
    assert loaded[nbt[-1]].item() == 2**40 + 67
    with safe_open(str(dst), "pt") as f:
        meta = f.metadata()
    assert meta["variant"] == CITYSCAPES
    assert meta["num_classes"] == "19"
    assert meta["format_version"] == "2" and json.loads(meta["test_scale_wh"]) == [2048, 1024]
    assert meta["source_sha256"] == hashlib.sha256(mmseg_pth.read_bytes()).hexdigest()
    assert meta["source_mmseg_version"] == "0.17.0+abc1234"
    assert meta["classes"] == '["' + '", "'.join(CLASSES_19) + '"]'
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]  # no temp file left behind


def test_convert_fills_missing_num_batches_tracked_with_int64_zero(light, tmp_path):
    src = _save_pth({k: v for k, v in light.items() if not k.endswith("num_batches_tracked")},
                    tmp_path / "no_nbt.pth")
    loaded = load_file(convert_checkpoint(src, tmp_path / "out.safetensors", CITYSCAPES))
    assert loaded["backbone.stem.1.num_batches_tracked"].dtype == torch.int64
    assert loaded["backbone.stem.1.num_batches_tracked"].item() == 0
    assert len(loaded) == 416


def test_convert_reports_class_mismatch_by_module_with_fix(light, tmp_path):
    sd = dict(light)
    sd["decode_head.conv_seg.weight"] = torch.zeros(150, 512, 1, 1)
    sd["decode_head.conv_seg.bias"] = torch.zeros(150)
    sd["auxiliary_head.conv_seg.weight"] = torch.zeros(150, 256, 1, 1)
    sd["auxiliary_head.conv_seg.bias"] = torch.zeros(150)
    src = _save_pth(sd, tmp_path / "ade.pth")
    dst = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(src, dst, CITYSCAPES)
    lines = str(err.value).splitlines()
    assert str(src) in lines[0] and CITYSCAPES in lines[0] and "4 mismatched" in lines[0]
    assert ("    decode_head.conv_seg: weight shape (150, 512, 1, 1) in file, (19, 512, 1, 1) expected; "
            "bias shape (150,) in file, (19,) expected — this checkpoint is for a 150-class variant; "
            f"pass --model {ADE} or num_classes=150") in lines
    assert ("    auxiliary_head.conv_seg: weight shape (150, 256, 1, 1) in file, (19, 256, 1, 1) expected; "
            "bias shape (150,) in file, (19,) expected") in lines
    assert not dst.exists()
    # the same file converts for the 150-class variant, or with num_classes=150
    assert convert_checkpoint(src, dst, ADE).exists()
    assert load_file(dst)["decode_head.conv_seg.bias"].shape == (150,)


def test_convert_reports_missing_and_unexpected_keys_by_module(light, tmp_path):
    sd = {k: v for k, v in light.items() if not k.startswith("backbone.layer1.0.bn1.")}
    sd["decode_head.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(_save_pth(sd, tmp_path / "x.pth"), tmp_path / "out.safetensors", CITYSCAPES)
    text = str(err.value)
    # num_batches_tracked may be absent, the four float tensors may not
    assert "  missing in file:\n    backbone.layer1.0.bn1: weight, bias, running_mean, running_var\n" in text
    assert "  unexpected in file:\n    decode_head.extra: weight" in text
    assert "0 mismatched, 4 missing, 1 unexpected keys" in text


def test_convert_of_a_resnet101_file_names_the_depth(light, tmp_path):
    sd = dict(light)
    for block in range(6, 23):  # R-101 has 23 layer3 blocks (spec §2.2), R-50 six
        for key, value in light.items():
            if key.startswith("backbone.layer3.1."):
                sd[key.replace("layer3.1.", f"layer3.{block}.")] = value
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(_save_pth(sd, tmp_path / "r101.pth"), tmp_path / "o.safetensors", CITYSCAPES)
    text = str(err.value)
    assert "306 unexpected keys" in text  # 17 blocks x 18 keys
    assert "... and " in text  # 102 modules are summarised, not listed
    assert len(text.splitlines()) < 20
    assert ("hint: backbone.layer3 has 23 blocks in file, 6 expected: this checkpoint is for a ResNet-101 "
            "variant; pick one from `isa list 'isanet_r101*'`") in text


def test_convert_failure_keeps_existing_destination(light, tmp_path):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"previous")
    sd = dict(light)
    del sd["backbone.stem.0.weight"]
    with pytest.raises(CheckpointError):
        convert_checkpoint(_save_pth(sd, tmp_path / "bad.pth"), dst, CITYSCAPES)
    assert dst.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["bad.pth", "out.safetensors"]


def test_convert_rejects_wrong_destination_suffix_and_unknown_model(mmseg_pth, tmp_path):
    with pytest.raises(ValueError, match=r"must end with \.safetensors"):
        convert_checkpoint(mmseg_pth, tmp_path / "out.pth", CITYSCAPES)
    with pytest.raises(KeyError, match="isanet_r50-d8_512x1024_40k_cityscapes"):
        convert_checkpoint(mmseg_pth, tmp_path / "out.safetensors", "isanet_r50-d8_512x1024_40k_cityscape")


def test_file_named_with_publish_hash_must_match_it(state, tmp_path):
    sd = {"a": torch.arange(4.0)}
    good = tmp_path / "tmp.pth"
    torch.save(sd, good)
    prefix = hashlib.sha256(good.read_bytes()).hexdigest()[:8]
    named = good.rename(tmp_path / f"x_20210901_054739-{prefix}.pth")
    assert torch.equal(read_state_dict(named)["a"], sd["a"])
    wrong = "0" * 8 if prefix != "0" * 8 else "1" * 8
    renamed = named.rename(tmp_path / f"x_20210901_054739-{wrong}.pth")
    with pytest.raises(CheckpointError, match=f"{renamed}: sha256 starts with {prefix} but the file name says {wrong}"):
        read_state_dict(renamed)
    assert torch.equal(read_state_dict(renamed, verify_hash=False)["a"], sd["a"])


# ------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "module_prefix", "legacy_format"])
def test_read_state_dict_accepts_mmseg_containers(layout, tmp_path):
    sd = {"backbone.stem.0.weight": torch.randn(2, 3), "backbone.stem.1.num_batches_tracked": torch.tensor(7)}
    obj = {"bare": sd, "state_dict": {"meta": {"iter": 40000}, "state_dict": sd, "optimizer": {}},
           "model": {"model": sd}, "module_prefix": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
           "legacy_format": {"state_dict": sd}}[layout]
    path = tmp_path / "c.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=layout != "legacy_format")
    out = read_state_dict(path)
    assert list(out) == list(sd)
    assert all(torch.equal(out[k], sd[k]) and out[k].dtype == sd[k].dtype for k in sd)


def test_read_state_dict_reads_safetensors(tmp_path):
    sd = {"x": torch.randn(3, 2), "n": torch.tensor(5, dtype=torch.int64)}
    save_file(sd, tmp_path / "w.safetensors")
    out = read_state_dict(tmp_path / "w.safetensors")
    assert torch.equal(out["x"], sd["x"]) and out["n"].dtype == torch.int64 and out["n"].item() == 5


def _rewrite_numpy1_names(src: Path, dst: Path) -> None:
    """Rename numpy 2's `numpy._core` pickle globals to numpy 1.x's `numpy.core`, as a 2021 file has."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info, data)


def test_numpy_scalars_in_meta_are_accepted_under_numpy1_and_numpy2_names(tmp_path):
    sd = {"w": torch.ones(2)}
    meta = {"seed": np.int64(3), "score": np.float64(0.5), "flag": np.bool_(True), "f32": np.float32(2)}
    torch.save({"meta": meta, "state_dict": sd}, tmp_path / "np2.pth")
    _rewrite_numpy1_names(tmp_path / "np2.pth", tmp_path / "np1.pth")
    for name in ("np2.pth", "np1.pth"):
        assert torch.equal(read_state_dict(tmp_path / name)["w"], sd["w"])


class _OpenFile:
    """Unpickling this calls open(marker, 'w'): the file appearing means code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _System:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("payload", [_OpenFile, _System])
@pytest.mark.parametrize("container", ["zip", "legacy", "raw_pickle", "top_level"])
def test_checkpoint_carrying_code_is_refused_and_never_runs(payload, container, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"meta": {"x": payload(marker)}, "state_dict": {"w": torch.zeros(2)}}
    if container == "zip":
        torch.save(obj, path)
    elif container == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif container == "raw_pickle":
        path.write_bytes(pickle.dumps({"meta": payload(marker)}, protocol=2))
    else:
        torch.save(payload(marker), path)
    with pytest.raises(UnsafeCheckpointError) as err:
        read_state_dict(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "refused" in message
    if container in ("zip", "legacy", "top_level"):
        assert ("open" in message) if payload is _OpenFile else ("system" in message)
    assert not marker.exists()
    # the converter and the loader share the reader
    with pytest.raises(UnsafeCheckpointError):
        convert_checkpoint(path, tmp_path / "o.safetensors", CITYSCAPES)
    assert not marker.exists()


def _small_files(tmp_path):
    sd = {f"layer{i}.weight": torch.randn(16, 16) for i in range(4)}
    sd["bn.num_batches_tracked"] = torch.tensor(3)
    files = {"pth": tmp_path / "small.pth", "pth_legacy": tmp_path / "small_legacy.pth",
             "safetensors": tmp_path / "small.safetensors"}
    torch.save({"state_dict": sd}, files["pth"])
    torch.save({"state_dict": sd}, files["pth_legacy"], _use_new_zipfile_serialization=False)
    save_file(sd, files["safetensors"])
    return files


def _raises_corrupt(path, call):
    """A damaged file is reported as such, naming it; never mistaken for a code-carrying one."""
    with pytest.raises(CheckpointError, match=str(path)) as err:
        call()
    assert not isinstance(err.value, UnsafeCheckpointError), str(err.value)
    assert "truncated or corrupt" in str(err.value) or "is empty" in str(err.value)


@pytest.mark.parametrize("fmt", ["pth", "pth_legacy", "safetensors"])
@pytest.mark.parametrize("cut", [0, 1, 8, 9, 64, 200, 0.5, -1])
def test_truncated_file_fails_with_error_naming_it(fmt, cut, tmp_path):
    data = _small_files(tmp_path)[fmt].read_bytes()
    keep = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    path = tmp_path / f"truncated.{fmt}"
    path.write_bytes(data[:keep])
    _raises_corrupt(path, lambda: read_state_dict(path))
    _raises_corrupt(path, lambda: load_weights(torch.nn.Linear(2, 2), path))


@pytest.mark.parametrize("fmt", ["pth", "pth_legacy", "safetensors"])
def test_corrupt_file_fails_with_error_naming_it(fmt, tmp_path):
    data = bytearray(_small_files(tmp_path)[fmt].read_bytes())
    data[:64] = b"\x80" + b"\x00" * 63 if fmt != "safetensors" else b"\x10" + b"\x00" * 7 + b"{not json" + b"#" * 55
    path = tmp_path / f"corrupt.{fmt}"
    path.write_bytes(bytes(data))
    _raises_corrupt(path, lambda: read_state_dict(path))
    garbage = tmp_path / f"garbage.{fmt}"
    garbage.write_bytes(b"<html>404 not found</html>")
    _raises_corrupt(garbage, lambda: read_state_dict(garbage))


def test_missing_file_raises_file_not_found_naming_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    for call in (lambda: read_state_dict(path), lambda: load_weights(torch.nn.Linear(1, 1), path),
                 lambda: convert_checkpoint(path, tmp_path / "o.safetensors", CITYSCAPES)):
        with pytest.raises(FileNotFoundError, match=str(path)):
            call()


def test_not_a_state_dict_is_refused_with_the_expected_layout(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a state_dict"):
        read_state_dict(path)
    torch.save({"state_dict": {"w": torch.zeros(1), "step": 3}}, path)
    with pytest.raises(CheckpointError, match="'step' are not tensors"):
        read_state_dict(path)


# ------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_load_weights_loads_every_tensor_exactly(fmt, state, mmseg_pth, tmp_path):
    path = mmseg_pth if fmt == "pth" else convert_checkpoint(mmseg_pth, tmp_path / "w.safetensors", CITYSCAPES)
    model = _model(seed=2)
    assert load_weights(model, path) == []
    for key, value in model.state_dict().items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key


def test_load_weights_reinitialises_both_classifiers_for_other_num_classes(state, mmseg_pth):
    model = _model(num_classes=5, seed=3)
    for head in (model.decode_head, model.auxiliary_head):
        torch.nn.init.constant_(head.conv_seg.weight, 1.0)
        torch.nn.init.constant_(head.conv_seg.bias, 1.0)
    torch.manual_seed(4)
    reinitialised = load_weights(model, mmseg_pth)
    assert reinitialised == list(CLASSIFIER_KEYS)
    loaded = model.state_dict()
    for key in state:
        if key not in CLASSIFIER_KEYS:
            assert torch.equal(loaded[key], state[key]), key
    for head, in_channels in ((model.decode_head, 512), (model.auxiliary_head, 256)):
        weight = head.conv_seg.weight.detach().double()
        assert weight.shape == (5, in_channels, 1, 1)
        # MMSeg's normal_init(std=0.01): n = 2560 / 1280 samples, sample std within ~4 sigma
        assert abs(weight.std().item() - 0.01) < 0.0012
        assert abs(weight.mean().item()) < 0.0015
        assert torch.equal(head.conv_seg.bias.detach(), torch.zeros(5))


def test_load_weights_of_another_variant_raises_with_fix(light, tmp_path):
    sd = dict(light)
    for key in CLASSIFIER_KEYS:  # a hand-made 150-class file
        shape = list(light[key].shape)
        sd[key] = torch.zeros([150] + shape[1:])
    path = _save_pth(sd, tmp_path / "ade.pth")
    model = _model()  # the Cityscapes variant's own 19 classes: the file is for another variant
    with pytest.raises(CheckpointError) as err:
        load_weights(model, path)
    assert str(path) in str(err.value)
    assert f"this checkpoint is for a 150-class variant; pass --model {ADE} or num_classes=150" in str(err.value)
    assert load_weights(model, path, strict_classifier=False) == list(CLASSIFIER_KEYS)
    assert torch.equal(model.state_dict()["backbone.stem.0.weight"], light["backbone.stem.0.weight"])


def test_load_weights_rejects_a_missing_backbone_tensor(light, tmp_path):
    sd = {k: v for k, v in light.items() if k != "backbone.layer4.2.conv3.weight"}
    path = _save_pth(sd, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing in file:\n    backbone\.layer4\.2\.conv3: weight$"):
        load_weights(_model(num_classes=5), path)


# ------------------------------------------------------------------------------ CLI


def _cli(argv):
    from isa.cli import main

    return main(argv)


def test_cli_convert_writes_file_and_reports_errors(light, tmp_path, capsys):
    mmseg_pth = _save_pth(light, tmp_path / "light.pth")
    dst = tmp_path / "o.safetensors"
    assert _cli(["convert", str(mmseg_pth), str(dst), "--model", CITYSCAPES]) == 0
    assert f"wrote {dst}: {CITYSCAPES}, 19 classes" in capsys.readouterr().out
    assert _cli(["convert", str(mmseg_pth), str(dst), "--model", "isanet_r50"]) == 2
    assert "unknown model 'isanet_r50'" in capsys.readouterr().err
    assert _cli(["convert", str(mmseg_pth), str(dst), "--model", ADE]) == 1
    assert "this checkpoint is for a 19-class variant" in capsys.readouterr().err
    assert _cli(["convert", str(mmseg_pth), str(tmp_path / "o2.safetensors"), "--model", ADE,
                 "--num-classes", "19"]) == 0
