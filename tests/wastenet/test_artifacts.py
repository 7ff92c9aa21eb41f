import hashlib
import json
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from wastenet.artifacts import (
    ArtifactError,
    DuplicateVersionError,
    config_digest,
    list_versions,
    load_version,
    publish_derived,
    publish_version,
    read_aliases,
    read_export,
    read_metadata,
    sha256_file,
    weights_sha256,
    write_aliases,
)
from wastenet.classes import CLASS_NAMES
from wastenet.nets import ModelConfig, build_model
from wastenet.schema import (
    FORMAT_VERSION,
    DerivedFrom,
    ExportedFile,
    Preprocessing,
    validate_model_name,
)

EVALUATION = {
    "split": "test",
    "num_samples": 120,
    "accuracy": 0.75,
    "macro_f1": 0.7,
    "per_class_f1": dict.fromkeys(CLASS_NAMES, 0.7),
}
NAME = "waste-resnet18-cbam"


def publish(repo: Path, config: ModelConfig | None = None, seed: int = 0, **kwargs: object) -> Path:
    config = config or ModelConfig()
    torch.manual_seed(seed)
    model = build_model(config)
    ref = publish_version(repo, NAME, model, config, CLASS_NAMES, EVALUATION, **kwargs)  # type: ignore[arg-type]
    return ref.path


@pytest.mark.parametrize(
    "config",
    [ModelConfig(), ModelConfig(arch="resnet34", cbam="block_post", ibn=True, head="bnneck")],
    ids=["resnet18-block", "resnet34-post-ibn-bnneck"],
)
def test_round_trip_gives_identical_logits(tmp_path: Path, config: ModelConfig) -> None:
    torch.manual_seed(3)
    model = build_model(config)
    # Make running statistics non-trivial so that buffers are part of the check.
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64))
    model.eval()
    ref = publish_version(tmp_path, NAME, model, config, CLASS_NAMES, EVALUATION)
    assert (ref.name, ref.version, ref.path) == (NAME, 1, tmp_path / NAME / "1")

    loaded = load_version(ref.path)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert not loaded.model.training
    assert loaded.metadata.architecture == config
    assert loaded.ref.version == 1


def test_model_json_describes_the_version(tmp_path: Path) -> None:
    pre = Preprocessing(resize_size=73, input_size=64)
    path = publish(tmp_path, preprocessing=pre, training_config={"epochs": 3, "lr": 0.1})
    raw = json.loads((path / "model.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION
    assert raw["class_names"] == list(CLASS_NAMES)
    assert raw["architecture"]["arch"] == "resnet18"
    assert raw["preprocessing"]["input_size"] == 64 and raw["preprocessing"]["resize_size"] == 73
    assert raw["weights_sha256"] == sha256_file(path / "weights.safetensors")
    assert raw["evaluation"]["macro_f1"] == 0.7
    assert raw["training_config_digest"] == config_digest({"lr": 0.1, "epochs": 3})
    assert raw["torch_version"] == torch.__version__
    assert raw["created_at"]


def test_versions_count_up_and_temp_folders_are_ignored(tmp_path: Path) -> None:
    publish(tmp_path, seed=0)
    (tmp_path / NAME / ".tmp-abandoned").mkdir()
    publish(tmp_path, seed=1)
    assert list_versions(tmp_path / NAME) == [1, 2]
    assert sorted(p.name for p in (tmp_path / NAME).iterdir()) == [".tmp-abandoned", "1", "2"]


def _publish_in_process(repo: str, seed: int) -> int:
    config = ModelConfig(cbam="none")
    torch.manual_seed(seed)  # distinct weights: equal ones would be refused as duplicates
    ref = publish_version(repo, NAME, build_model(config), config, CLASS_NAMES, EVALUATION)
    return ref.version


def test_concurrent_publishes_get_distinct_versions(tmp_path: Path) -> None:
    # spawn, not fork: forking a process whose torch thread pools are running can deadlock.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=3, mp_context=spawn) as pool:
        versions = list(pool.map(_publish_in_process, [str(tmp_path)] * 4, range(4)))
    assert sorted(versions) == [1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path / NAME)) == sorted(str(v) for v in versions)
    for v in versions:
        read_metadata(tmp_path / NAME / str(v))


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    path = publish(tmp_path)
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch") as err:
        load_version(path)
    assert err.value.path == weights


def test_truncated_weights_are_refused(tmp_path: Path) -> None:
    path = publish(tmp_path)
    weights = path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=r"sha256 mismatch.*\(1000 bytes\)"):
        load_version(path)


def test_unreadable_weights_with_matching_hash_are_refused(tmp_path: Path) -> None:
    path = publish(tmp_path)
    weights = path / "weights.safetensors"
    weights.write_bytes(b"garbage")
    meta = json.loads((path / "model.json").read_text())
    meta["weights_sha256"] = sha256_file(weights)
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_version(path)


def test_weights_that_do_not_fit_the_architecture(tmp_path: Path) -> None:
    path = publish(tmp_path)
    meta = json.loads((path / "model.json").read_text())
    meta["architecture"]["arch"] = "resnet34"
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="do not fit the architecture"):
        load_version(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("weights_sha256"), "weights_sha256: Field required"),
        (lambda m: m.pop("evaluation"), "evaluation: Field required"),
        (lambda m: m["preprocessing"].update(std=[0.2, 0.0, 0.2]), "std must be positive"),
        (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
        (lambda m: m.update(class_names=m["class_names"][:5]), "5 class_names but"),
        (lambda m: m["architecture"].update(cbam="everywhere"), "architecture.cbam"),
    ],
)
def test_incomplete_metadata_names_the_problem(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    path = publish(tmp_path)
    meta = json.loads((path / "model.json").read_text())
    edit(meta)
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=message) as err:
        load_version(path)
    assert err.value.path == path / "model.json"


def test_missing_and_broken_model_json(tmp_path: Path) -> None:
    path = publish(tmp_path)
    (path / "model.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_metadata(path)
    (path / "model.json").unlink()
    with pytest.raises(ArtifactError, match="model.json: missing"):
        load_version(path)


def test_publish_refuses_inconsistent_metadata_and_leaves_nothing(tmp_path: Path) -> None:
    config = ModelConfig(num_classes=5)
    with pytest.raises(ValueError, match="12 class_names but architecture.num_classes is 5"):
        publish_version(tmp_path, NAME, build_model(config), config, CLASS_NAMES, EVALUATION)
    assert os.listdir(tmp_path / NAME) == []


@pytest.mark.parametrize("name", ["", "Waste", "-x", "a" * 65, "a/b", "..", "waste model"])
def test_invalid_model_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid model name"):
        validate_model_name(name)


def test_aliases_round_trip_and_validation(tmp_path: Path) -> None:
    assert read_aliases(tmp_path) == {}
    write_aliases(tmp_path, {"staging": 4, "production": 3})
    assert read_aliases(tmp_path) == {"production": 3, "staging": 4}
    assert [p.name for p in tmp_path.iterdir()] == ["aliases.json"]
    with pytest.raises(ValueError, match="'latest'"):
        write_aliases(tmp_path, {"latest": 1})
    (tmp_path / "aliases.json").write_text(json.dumps({"production": "three"}))
    with pytest.raises(ArtifactError, match="must point to a positive integer"):
        read_aliases(tmp_path)


def test_only_ascii_version_folders_are_versions(tmp_path: Path) -> None:
    publish(tmp_path)
    model_dir = tmp_path / NAME
    # str.isdigit() accepts the first four, int() reads '١' and '１' as 1 and refuses '²'.
    for junk in ("²", "١", "１", "01", "0", "1_0", "v2", "1234567890"):
        (model_dir / junk).mkdir()
    (model_dir / "7").write_text("a file, not a folder")
    (model_dir / "8").symlink_to(model_dir / "missing")
    assert list_versions(model_dir) == [1]
    with pytest.raises(ArtifactError, match="1-9 ASCII digits without a leading zero"):
        load_version(model_dir / "١")


def test_publish_skips_a_stray_file_that_holds_the_next_number(tmp_path: Path) -> None:
    publish(tmp_path)
    (tmp_path / NAME / "2").write_text("not a version")
    (tmp_path / NAME / "3").symlink_to(tmp_path / "nowhere")
    # Run where a hang shows as a failure: before, publishing retried number 2 forever.
    done: list[Path] = []
    worker = threading.Thread(target=lambda: done.append(publish(tmp_path, seed=1)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert done == [tmp_path / NAME / "4"]
    assert list_versions(tmp_path / NAME) == [1, 4]


# ------------------------------------------------------------------ duplicates and exports


def test_publishing_the_same_weights_twice_is_refused_naming_the_version(tmp_path: Path) -> None:
    first = publish(tmp_path, seed=0)
    with pytest.raises(DuplicateVersionError, match=r"already published as .* version 1 ") as exc:
        publish(tmp_path, seed=0)
    assert exc.value.existing.path == first
    assert "--force" in str(exc.value)
    assert list_versions(tmp_path / NAME) == [1]
    assert not list((tmp_path / NAME).glob(".tmp-*"))
    # Other weights publish as usual; forcing publishes the same weights again.
    assert publish(tmp_path, seed=1).name == "2"
    assert publish(tmp_path, seed=0, force=True).name == "3"
    metas = [read_metadata(tmp_path / NAME / v) for v in ("1", "3")]
    assert metas[0].weights_sha256 == metas[1].weights_sha256


def test_weights_sha256_is_the_published_files_hash(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = build_model(ModelConfig(cbam="none"))
    path = publish_version(tmp_path, NAME, model, ModelConfig(cbam="none"), CLASS_NAMES, EVALUATION)
    assert weights_sha256(model) == sha256_file(path.path / "weights.safetensors")


def _fake_export(
    folder: Path, content: bytes, precision: str = "fp32"
) -> tuple[Path, ExportedFile]:
    """A stand-in exported file (any bytes) and its record."""
    path = folder / f"{precision}-{hashlib.sha256(content).hexdigest()[:8]}.onnx"
    path.write_bytes(content)
    record = ExportedFile(
        file="model.onnx",
        precision="fp32",
        sha256=hashlib.sha256(content).hexdigest(),
        opset=18,
        input_name="input",
        output_name="logits",
    )
    return path, record


def test_exported_files_are_published_with_their_hashes(tmp_path: Path) -> None:
    source, record = _fake_export(tmp_path, b"an onnx graph")
    path = publish(tmp_path / "models", exports=[(source, record)])
    meta = read_metadata(path)
    assert meta.exports == [record]
    assert meta.export("fp32") == record and meta.export("int8") is None
    assert read_export(path, record) == b"an onnx graph"


def test_an_exported_file_that_changed_is_not_published(tmp_path: Path) -> None:
    source, record = _fake_export(tmp_path, b"an onnx graph")
    source.write_bytes(b"another graph")
    with pytest.raises(ArtifactError, match="changed while being published as model.onnx"):
        publish(tmp_path / "models", exports=[(source, record)])
    assert os.listdir(tmp_path / "models" / NAME) == []


def test_a_derived_version_keeps_the_weights_and_records_its_source(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    first = publish(repo, seed=0, description="the original")
    before = (first / "model.json").read_bytes()
    source = load_version(first)
    ref = publish_derived(source, [_fake_export(tmp_path, b"graph")], extra={"note": 1})
    assert (ref.name, ref.version) == (NAME, 2)
    meta = read_metadata(ref.path)
    sha = source.metadata.weights_sha256
    assert meta.derived_from == DerivedFrom(name=NAME, version=1, weights_sha256=sha)
    assert meta.weights_sha256 == sha == sha256_file(ref.path / "weights.safetensors")
    assert meta.description == "the original" and meta.evaluation == source.metadata.evaluation
    assert meta.model_extra is not None and meta.model_extra["note"] == 1
    assert [e.file for e in meta.exports] == ["model.onnx"]
    assert (first / "model.json").read_bytes() == before  # the source never changes
    assert sorted(os.listdir(first)) == ["model.json", "weights.safetensors"]


def test_deriving_the_same_exports_twice_is_refused(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    source = load_version(publish(repo, seed=0))
    publish_derived(source, [_fake_export(tmp_path, b"graph")])
    with pytest.raises(DuplicateVersionError, match=r"with fp32 ONNX as .* version 2 ") as exc:
        publish_derived(source, [_fake_export(tmp_path, b"graph 2")])
    assert exc.value.existing.version == 2
    assert list_versions(repo / NAME) == [1, 2]
    # A fresh publish of those weights is refused too (naming the newest such version) ...
    with pytest.raises(DuplicateVersionError, match="version 2 "):
        publish(repo, seed=0)
    # ... and both go through when forced.
    assert publish_derived(source, [_fake_export(tmp_path, b"graph 3")], force=True).version == 3
