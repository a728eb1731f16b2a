"""Build ensembles declared in ensembles.yaml into model_store/<name>.mar.

Usage: python -m archive_scripts.build_archives [--config ensembles.yaml] [--store model_store] [NAME ...]

For each member the checkpoint is hashed (a declared sha256 must match), read safely (weights_only=True
or safetensors), its weights picked and renamed by the member's `state_dict:` rules and loaded with
strict=True to prove they fit. The archive stores them normalized, as one flat `.safetensors` state_dict
per member, so serving never runs the rules. It also holds the handler package, every member's model
file, `ensemble.json` (the resolved ensemble, file digests, each member's source checkpoint and
digest, build versions) and `model-config.yaml` (batching, workers, timeout). It is built in a staging folder,
loaded back the way TorchServe will load it, and only then renamed into place: a failure leaves no `.mar`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import yaml
from model_archiver.model_archiver_config import ModelArchiverConfig
from model_archiver.model_packaging import generate_model_archive

from handlers.config.files import MANIFEST_NAME, load_ensembles
from handlers.config.policy import DEFAULT_THRESHOLD
from handlers.config.schema import MANIFEST_FORMAT
from handlers.config.specs import Arch, EnsembleSpec, InputSpec, MemberSpec, StateDictRules
from handlers.ensemble import Ensemble
from handlers.errors import ConfigError, EnsembleError
from handlers.execution.engines import EngineUnavailable, Export, export_onnx, precision_unsupported
from handlers.execution.outputs import fit_head
from handlers.execution.precision import calibration_rows, lossy_forward, measure, quantize_int8, refuse_below
from handlers.weights.checkpoints import Fitted, save_normalized
from handlers.weights.loading import build_member, member_weights, sha256_of, source_digest

HANDLERS_DIR = Path(__file__).resolve().parent.parent / "handlers"
HANDLER_FILE = "ensemble_handler.py"
EXPORT_CACHE = HANDLERS_DIR.parent / "build" / "onnx-cache"
EXPORT_CODE = ("engines.py", "outputs.py")
FORGIVEN_WHY = {
    "filled": "with 0: its checkpoint predates PyTorch 0.4.1, and torch's strict loading fills them the same way",
    "discarded": "of FrozenBatchNorm2d layers, which have no place for them; torchvision drops them the same way",
}


def build_archive(spec: EnsembleSpec, store: Path) -> Path:
    """Build, verify and atomically place `store/<name>.mar`; raise EnsembleError saying what is wrong."""
    store.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{spec.name}-", dir=store))
    try:
        payload = staging / "payload"
        shutil.copytree(HANDLERS_DIR, payload / "handlers", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        members, digests, sources, engines = _stage_members(spec, payload)
        packed = replace(spec, members=members)
        digests.update(
            {p.relative_to(payload).as_posix(): sha256_of(p) for p in sorted((payload / "handlers").rglob("*.py"))}
        )
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": spec.name,
            "ensemble": packed.to_dict(),
            "digests": digests,
            "sources": sources,
            "engines": engines,
            "build": _build_info(),
        }
        (payload / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        (staging / "model-config.yaml").write_text(yaml.safe_dump(model_config(spec), sort_keys=False))
        out = staging / "out"
        out.mkdir()
        generate_model_archive(
            ModelArchiverConfig(
                model_name=spec.name,
                handler=str(payload / "handlers" / HANDLER_FILE),
                version=spec.version,
                extra_files=str(payload),
                export_path=str(out),
                config_file=str(staging / "model-config.yaml"),
                force=True,
            )
        )
        archive = out / f"{spec.name}.mar"
        _load_back(archive, staging / "check")
        target = store / archive.name
        os.replace(archive, target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stage_members(
    spec: EnsembleSpec, payload: Path
) -> tuple[tuple[MemberSpec, ...], dict[str, str], dict[str, dict], dict[str, dict]]:
    """Write normalized weights and copy model files into the payload.

    Returns the members as the archive declares them (archive paths, no rules left to apply), the
    digest of every staged file, each member's source checkpoint, and its ONNX export (or why there is none).
    """
    (payload / "members").mkdir()
    (payload / "code").mkdir()
    digests: dict[str, str] = {}
    sources: dict[str, dict] = {}
    engines: dict[str, dict] = {}
    code_sources: dict[str, Path] = {}
    members = []
    for member in spec.members:
        source_sha256 = source_digest(member, spec.base_dir)
        weights = f"members/{member.name}.safetensors"
        module = build_member(member, spec.base_dir)
        fitted = member_weights(member, spec.base_dir, module)
        save_normalized(fitted.state, payload / weights)
        digests[weights] = sha256_of(payload / weights)
        sources[member.name] = {
            "file": member.weights,
            "sha256": source_sha256,
            "state_dict": member.state_dict.to_dict(),
            **fitted.record(),
        }
        onnx = f"members/{member.name}.onnx"
        head, export = _export(spec, member, module, fitted, payload / onnx, payload / weights)
        if export.exporter is not None:
            digests[onnx] = sha256_of(payload / onnx)
        engines[member.name] = export.record(onnx)
        if spec.member_execution(member).precision != "fp32":
            lossy = _lossy(spec, member, head, export, payload / onnx)
            engines[member.name].update(lossy)
            if "int8" in lossy:
                digests[lossy["int8"]] = sha256_of(payload / lossy["int8"])
        arch = member.arch
        if member.arch_file is not None:
            source = (spec.base_dir / member.arch_file).resolve()
            hugging_face = Arch.parse(member.arch).kind == "transformers"
            packed = f"code/{member.name}/{source.name}" if hugging_face else f"code/{source.name}"
            if code_sources.setdefault(packed, source) != source:
                raise ConfigError(f"members {member.name!r}: two different model files are named {source.name}")
            (payload / packed).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, payload / packed)
            digests[packed] = sha256_of(payload / packed)
            arch = f"transformers:code/{member.name}" if hugging_face else f"{packed}:{member.arch.rsplit(':', 1)[1]}"
        members.append(
            replace(member, arch=arch, weights=weights, sha256=digests[weights], state_dict=StateDictRules())
        )
    return tuple(members), digests, sources, engines


def _export(
    spec: EnsembleSpec, member: MemberSpec, module: torch.nn.Module, fitted: Fitted, path: Path, weights: Path
) -> tuple[torch.nn.Module, Export]:
    """The member, behind the head that serves it, exported to ONNX and proven against eager at the slice sizes.

    Exports are cached in build/onnx-cache under a key of everything the graph depends on (the normalized weights,
    the member's architecture, kwargs, output and labels, the ensemble's labels and task, the input, the code that
    exports and torch's version): rebuilding an unchanged member proves the cached file instead of exporting again.
    """
    module.load_state_dict(fitted.state, strict=True)
    given = spec.member_input(member)
    head = fit_head(member, module.eval(), given.instance_shape, spec.task, spec.labels, torch.device("cpu"))
    key = json.dumps(
        [
            sha256_of(weights),
            member.arch,
            dict(member.kwargs),
            member.output.to_dict(),
            member.labels,
            spec.labels,
            spec.task,
            given.instance_shape,
            torch.__version__,
            [sha256_of(HANDLERS_DIR / "execution" / f) for f in EXPORT_CODE],
        ],
        sort_keys=True,
        default=list,
    )
    cache = EXPORT_CACHE / hashlib.sha256(key.encode()).hexdigest()[:32]
    return head, export_onnx(head, given.instance_shape, path, spec.slice_sizes(1, given.views), cache)


def _lossy(spec: EnsembleSpec, member: MemberSpec, head: torch.nn.Module, export: Export, onnx: Path) -> dict[str, Any]:
    """A lossy precision measured against fp32 on the calibration images, refused below min_agreement; for int8, the
    quantised export (archived next to the fp32 one). Returns what the manifest's `engines` entry gains."""
    execution = spec.member_execution(member)
    precision = execution.precision
    where = f"members {member.name!r}: precision {precision}"
    if execution.plan != "auto":
        raise ConfigError(
            f"{where} runs on the engines measured for it: leave execution.plan at auto, not {execution.plan!r}"
        )
    if export.exporter is None:
        raise ConfigError(
            f"{where} runs on the member's ONNX export, and the member could not be exported: {export.reason}"
        )
    given = spec.member_input(member)
    if not isinstance(given, InputSpec):
        raise ConfigError(f"{where} is calibrated on images, and this member takes tensors; serve it in fp32")
    if execution.calibration is None:
        raise ConfigError(f"{where} needs execution.calibration: a folder of images like the ones it will serve")
    unsupported = precision_unsupported(precision)
    if unsupported is not None:
        print(f"warning: {where}: measured here, but {unsupported}; workers on such CPUs serve it in fp32")
    rows = calibration_rows(spec.base_dir / execution.calibration, given, spec.limits)
    int8 = onnx.with_name(f"{member.name}.int8.onnx") if precision == "int8" else None
    if int8 is not None:
        quantize_int8(onnx, int8, rows)
    threshold = spec.policy.threshold if spec.policy.threshold is not None else DEFAULT_THRESHOLD
    try:
        lossy = lossy_forward(precision, onnx, int8)
    except EngineUnavailable as e:
        raise ConfigError(f"{where} cannot be measured here: {e}; serve it in fp32") from e
    agreement = measure(precision, head, lossy, rows, given.views, spec.task, threshold)
    refuse_below(agreement, execution.min_agreement, member.name)
    return {"precision": agreement.record(), **({} if int8 is None else {"int8": f"members/{int8.name}"})}


def _load_back(archive: Path, where: Path) -> None:
    """Extract the archive and load it exactly as the handler will, so a bad archive never ships."""
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(where)
    Ensemble.from_model_dir(where, torch.device("cpu"))


def forgiven_lines(archive: Path) -> list[str]:
    """One line per member whose weights torch's loading rules completed, or that ONNX could not take, read back
    from the archive's manifest."""
    with zipfile.ZipFile(archive) as zipped:
        manifest = json.loads(zipped.read(MANIFEST_NAME))
    lines = []
    for member, onnx in manifest.get("engines", {}).items():
        if "refused" in onnx:
            lines.append(f"member {member!r}: not exported to ONNX, served by the other plans: {onnx['refused']}")
        if "precision" in onnx:
            measured = onnx["precision"]
            lines.append(
                f"member {member!r}: {measured['precision']} agrees with fp32 on {measured['agreement']:.4f} of "
                f"{measured['images']} calibration images "
                f"(largest probability difference {measured['largest_difference']:g})"
            )
    for member, source in manifest["sources"].items():
        for kind, counts in (("filled", source.get("filled", {})), ("discarded", source.get("discarded", {}))):
            for buffer, count in counts.items():
                why = FORGIVEN_WHY[kind]
                lines.append(f"member {member!r}: {kind} {count} {buffer} buffers {why} (recorded in its provenance)")
    return lines


def required_packages(specs: Iterable[EnsembleSpec]) -> list[str]:
    """The `<distribution>==<version>` pins the members' code comes from (timm, transformers, installed packages)."""
    return sorted({member.requires for spec in specs for member in spec.members if member.requires})


def model_config(spec: EnsembleSpec) -> dict[str, int]:
    """The ensemble's batching in TorchServe's keys; the KServe export writes the same into its model_snapshot."""
    batching = spec.batching
    return {
        "minWorkers": batching.workers,
        "maxWorkers": batching.workers,
        "batchSize": batching.batch_size,
        "maxBatchDelay": batching.max_batch_delay_ms,
        "responseTimeout": batching.response_timeout_s,
    }


def _build_info() -> dict[str, str]:
    return {
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "torchserve": version("torchserve"),
        "torch_model_archiver": version("torch-model-archiver"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("ensembles.yaml"))
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("names", nargs="*", help="ensembles to build (default: all)")
    args = parser.parse_args()
    try:
        specs = load_ensembles(args.config)
        unknown = sorted(set(args.names) - set(specs))
        if unknown:
            raise ConfigError(f"{args.config.name}: no ensemble named {unknown}; declared: {sorted(specs)}")
        built = args.names or list(specs)
        for name in built:
            target = build_archive(specs[name], args.store)
            print(f"built {target} ({target.stat().st_size / 1e6:.1f} MB, {len(specs[name].members)} members)")
            for line in forgiven_lines(target):
                print(f"  {line}")
        needed = required_packages(specs[name] for name in built)
        if needed:
            print("TorchServe's environment needs these packages, at these versions (the archives pin them):")
            print("  pip install " + " ".join(f"'{pin}'" for pin in needed))
    except EnsembleError as e:
        raise SystemExit(f"build failed: {e}") from e


if __name__ == "__main__":
    main()
