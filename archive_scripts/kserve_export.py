"""Write the storage layout our KServe runtime serves an ensemble from.

Usage: python -m archive_scripts.kserve_export [--config ensembles.yaml] [--store model_store]
           [--out build/kserve] NAME ...

KServe downloads an InferenceService's `storageUri` to /mnt/models, and our runtime
(deploy/kserve/servingruntime.yaml) runs
`torchserve --model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties`;
its wrapper reads the model names from that config's `model_snapshot`. So each NAME gets
`<out>/<NAME>/model-store/<NAME>.mar`, `<out>/<NAME>/config/config.properties` (the profile
deploy/kserve/config.properties with `model_snapshot` filled from the ensemble's batching) and
`<out>/<NAME>/config/metrics.yaml` (monitoring/metrics.yaml, which declares the ensemble's counters). With the
model API off, the snapshot is the only way the archive gets registered, and TorchServe takes workers,
batch size, delay and timeout from it rather than from the archive's model-config.yaml.
One ensemble per layout: each is its own InferenceService, scaled and rolled out on its own.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import zipfile
from pathlib import Path

import yaml

from archive_scripts.build_archives import model_config
from handlers.config.files import load_ensembles
from handlers.config.specs import EnsembleSpec
from handlers.errors import ConfigError, EnsembleError

PROFILE = Path(__file__).resolve().parent.parent / "deploy" / "kserve" / "config.properties"
METRICS_CONFIG = Path(__file__).resolve().parent.parent / "monitoring" / "metrics.yaml"
SNAPSHOT_LINE = re.compile(r"(?m)^model_snapshot=.*$")


def snapshot(spec: EnsembleSpec) -> dict:
    """TorchServe's startup snapshot registering `<name>.mar` as the default version with the ensemble's batching."""
    entry = {"defaultVersion": True, "marName": f"{spec.name}.mar", **model_config(spec)}
    return {"name": "startup.cfg", "modelCount": 1, "models": {spec.name: {spec.version: entry}}}


def render_config(profile: str, spec: EnsembleSpec) -> str:
    """The profile with its one model_snapshot line replaced; the wrapper reads that JSON from a single line."""
    line = "model_snapshot=" + json.dumps(snapshot(spec), separators=(",", ":"))
    config, found = SNAPSHOT_LINE.subn(lambda _: line, profile)
    if found != 1:
        raise ConfigError(f"{PROFILE.name}: expected one model_snapshot line, found {found}")
    return config


def check_archive(archive: Path, spec: EnsembleSpec) -> None:
    """Refuse an archive built from another version or batching: the snapshot would silently overrule it."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            built_version = json.loads(zipped.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"]
            built_batching = yaml.safe_load(zipped.read("model-config.yaml"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{archive}: not a readable ensemble archive ({e}); run `make build`") from e
    if (built_version, built_batching) != (spec.version, model_config(spec)):
        raise ConfigError(
            f"{archive} was built as version {built_version} with {built_batching}, but ensembles.yaml declares "
            f"version {spec.version} with {model_config(spec)}; rebuild it with `make build`"
        )


def export(spec: EnsembleSpec, store: Path, out: Path, profile: Path = PROFILE) -> Path:
    """Write `out/<name>/` from `store/<name>.mar` and the profile; return the layout folder.

    The folder is replaced as a whole, since it is uploaded as a whole: nothing stale may remain in it.
    """
    archive = store / f"{spec.name}.mar"
    check_archive(archive, spec)
    layout = out / spec.name
    shutil.rmtree(layout, ignore_errors=True)
    (layout / "model-store").mkdir(parents=True)
    (layout / "config").mkdir()
    shutil.copyfile(archive, layout / "model-store" / archive.name)
    (layout / "config" / "config.properties").write_text(render_config(profile.read_text(), spec))
    shutil.copyfile(METRICS_CONFIG, layout / "config" / "metrics.yaml")
    return layout


def upload_hint(layout: Path) -> str:
    """How to put the layout where an InferenceService's storageUri points."""
    name = layout.name
    return "\n".join(
        [
            f"upload {layout}/ as the InferenceService's storageUri, e.g.:",
            f"  gsutil -m rsync -r -d {layout} gs://YOUR-BUCKET/ensembles/{name}",
            f"  aws s3 sync --delete {layout} s3://YOUR-BUCKET/ensembles/{name}",
            f"  kubectl cp {layout} <pod-mounting-the-pvc>:<mount>/ensembles/{name}",
            f"    (then storageUri: pvc://<pvc-name>/ensembles/{name})",
            "then set storageUri in deploy/kserve/inferenceservice.yaml and apply it with our runtime:",
            "  kubectl apply -n <namespace> -f deploy/kserve/servingruntime.yaml"
            " -f deploy/kserve/inferenceservice.yaml",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("ensembles.yaml"))
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--out", type=Path, default=Path("build/kserve"))
    parser.add_argument("names", nargs="+", help="ensembles to export, one layout folder each")
    args = parser.parse_args()
    try:
        specs = load_ensembles(args.config, check_files=False)
        unknown = sorted(set(args.names) - set(specs))
        if unknown:
            raise ConfigError(f"{args.config.name}: no ensemble named {unknown}; declared: {sorted(specs)}")
        for name in args.names:
            layout = export(specs[name], args.store, args.out)
            print(f"KServe layout for {name}: {layout}/ (config/config.properties, model-store/{name}.mar)")
            print(upload_hint(layout))
    except EnsembleError as e:
        raise SystemExit(f"export failed: {e}") from e


if __name__ == "__main__":
    main()
