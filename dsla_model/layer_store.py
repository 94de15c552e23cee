"""The layer store: distilled DSLA layers on disk, one safetensors file per layer.

Layout of a store directory:

    manifest.json        model id, model fingerprint, order, DSLA config, store version,
                         and per layer: position in the order, version, metrics, sha256, time, file
    layer_025.v3.safetensors   only the DSLA module's own tensors (gates, alpha, head scale,
                         optional low-rank deltas): the teacher's weights are never copied

Publishing writes the layer file under a temporary name and renames it, then rewrites
the manifest the same way while holding an fcntl lock on `.lock`, so a reader sees
either the old or the new store, never half of one. Every layer file name carries its
version, so a reader holding an old manifest still finds the file it names until the
next publish of that layer. Files also carry the model fingerprint in their safetensors
metadata, so a file copied from another model's store is refused even if a manifest
was edited to match. One distiller writes a store at a time (it holds `.writer` while it
runs), and only the store it was built for: one wiped and initialised again since is refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

MANIFEST = "manifest.json"
FORMAT = 1


log = logging.getLogger(__name__)
_WARNED: set = set()  # stores whose legacy fingerprint was reported


class LayerStoreError(Exception):
    """The store cannot serve what was asked: missing, corrupt, or for another model."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safetensors_metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors file's bytes (an 8-byte header length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 or n > len(data) - 8:
        raise ValueError("truncated header")
    header = json.loads(data[8:8 + n])
    return (header.get("__metadata__") if isinstance(header, dict) else None) or {}


def _sync_dir(path: Path):
    """A rename is durable only once its directory is synced: after a power loss the store could
    otherwise come back with the old manifest, or a manifest naming a layer file that is not there."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


class LayerStore:
    def __init__(self, path):
        self.path = Path(path)

    # ---- reading -------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def read_manifest(self) -> dict:
        p = self.path / MANIFEST
        if not p.is_file():
            raise LayerStoreError(f"{self.path} is not a layer store (no {MANIFEST})")
        try:
            m = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LayerStoreError(f"{p} is not valid JSON: {e}") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("layers"), dict):
            raise LayerStoreError(f"{p} is not a DSLA layer store manifest (format {FORMAT})")
        # readers index these without checks: a hand-edited or truncated manifest is one error here
        # (a TypeError or ValueError from deep inside a reader gets past every caller's except)
        from dsla_model.dsla_attention import DSLAConfig

        ok = (isinstance(m.get("version"), int) and isinstance(m.get("order"), list)
              and all(type(x) is int for x in m["order"])
              and isinstance(m.get("model_fingerprint"), str) and isinstance(m.get("dsla_config"), dict)
              and set(m["dsla_config"]) <= {f.name for f in dataclasses.fields(DSLAConfig)}
              and all(isinstance(k, str) and k.isdigit() for k in m["layers"])
              and all(isinstance(e, dict) and {"position", "version", "file", "sha256"} <= e.keys()
                      and isinstance(e["position"], int) and isinstance(e["version"], int)
                      and isinstance(e["file"], str) and "/" not in e["file"] and isinstance(e["sha256"], str)
                      for e in m["layers"].values()))
        if not ok:
            raise LayerStoreError(f"{p}: manifest incomplete or malformed (version, integer order, "
                                  "model_fingerprint, dsla_config of known settings, and each layer's (a number) "
                                  "integer position and version, file name and sha256 are required)")
        return m

    @property
    def version(self) -> int:
        return int(self.read_manifest()["version"]) if self.exists() else 0

    def published_layers(self, manifest: dict | None = None) -> list[int]:
        """Published layers, in the order they were distilled (their position); of `manifest` when
        the caller has just read it."""
        if manifest is None:
            if not self.exists():
                return []
            manifest = self.read_manifest()
        layers = manifest["layers"]
        return [int(k) for k, _ in sorted(layers.items(), key=lambda kv: kv[1]["position"])]

    def holds_model(self, manifest: dict, fingerprint: str) -> bool:
        """The store's model is this one: its fingerprint, or (a store written before the config
        joined the fingerprint) the weights-only one, accepted with a warning: its config is unchecked."""
        from dsla_model.loading import legacy_fingerprint

        if manifest["model_fingerprint"] == fingerprint:
            return True
        if manifest["model_fingerprint"] != legacy_fingerprint(fingerprint):
            return False
        if self.path not in _WARNED:
            _WARNED.add(self.path)
            log.warning("layer store %s predates config fingerprints: accepted by the model's weights alone "
                        "(a changed RoPE or norm epsilon would go unnoticed); distil it again to check those", self.path)
        return True

    def load_layer(self, layer: int, expected_fingerprint: str | None) -> dict:
        """The layer's DSLA state dict, after checking its sha256 and the model fingerprint."""
        return self.load_layer_entry(layer, expected_fingerprint)[0]

    def load_layer_entry(self, layer: int, expected_fingerprint: str | None) -> tuple[dict, dict]:
        """(state dict, the manifest entry it was checked against): the entry names the version
        read, which a publish between the caller's own manifest read and this one can change."""
        m, entry, data = self._read_layer_file(layer, expected_fingerprint)
        f = self.path / entry["file"]
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise LayerStoreError(f"layer {layer}: {f.name} is corrupt (sha256 {digest[:12]}... "
                                  f"!= manifest {entry['sha256'][:12]}...)")
        try:
            meta = _safetensors_metadata(data)
            tensors = load(data)
        except (SafetensorError, ValueError) as e:
            raise LayerStoreError(f"layer {layer}: {f.name} is not a readable safetensors file: {e}") from None
        if meta.get("model_fingerprint") != m["model_fingerprint"] or meta.get("layer") != str(layer):
            raise LayerStoreError(f"layer {layer}: {f.name} belongs to another model or layer "
                                  f"(file says layer {meta.get('layer')}, fingerprint {meta.get('model_fingerprint')})")
        return tensors, entry

    def _read_layer_file(self, layer: int, expected_fingerprint: str | None, attempts: int = 3):
        """(manifest, entry, file bytes) of a layer. The bytes are read once, so the checks and
        the load see the same file; a publish of the layer deletes the file an older manifest
        names, so a missing file is looked up again in the new manifest."""
        for _ in range(attempts):
            m = self.read_manifest()
            if expected_fingerprint is not None and not self.holds_model(m, expected_fingerprint):
                raise LayerStoreError(
                    f"store {self.path} was distilled for model {m.get('model_id')!r} "
                    f"(fingerprint {m['model_fingerprint']}), not this one ({expected_fingerprint})")
            entry = m["layers"].get(str(layer))
            if entry is None:
                raise LayerStoreError(f"layer {layer} is not published in {self.path} "
                                      f"(published: {self.published_layers()})")
            try:
                return m, entry, (self.path / entry["file"]).read_bytes()
            except FileNotFoundError:
                if self.read_manifest()["layers"].get(str(layer)) == entry:
                    break  # not replaced by a publish: really missing
            except OSError as e:  # a directory, no permission: as unusable as a corrupt file
                raise LayerStoreError(f"layer {layer}: cannot read {self.path / entry['file']}: {e}") from None
        raise LayerStoreError(f"layer {layer}: file {self.path / entry['file']} is missing")

    def dsla_config(self):
        from dsla_model.dsla_attention import DSLAConfig

        return DSLAConfig.from_dict(self.read_manifest()["dsla_config"])

    def apply(self, hybrid, layers) -> None:
        """Convert `layers` of `hybrid` to DSLA with the stored weights (all or nothing)."""
        cfg = self.dsla_config()
        # Load and check everything before touching the model, so a bad layer leaves it as it was.
        try:
            modules = {i: hybrid.new_dsla_module(i, self.load_layer(i, hybrid.fingerprint), cfg) for i in layers}
        except ValueError as e:  # a file whose tensors do not fit the manifest's config
            raise LayerStoreError(f"store {self.path}: {e}") from None
        for i, mod in modules.items():
            hybrid.install(i, mod)
            hybrid.convert(i)

    # ---- writing -------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def init(self, model_id: str, fingerprint: str, order: list[int], dsla_config) -> dict:
        """Create the store, or check that an existing one is for this model and config."""
        cfg = dsla_config.to_dict() if hasattr(dsla_config, "to_dict") else dict(dsla_config)
        cfg = json.loads(json.dumps(cfg))  # tuples -> lists, as stored
        with self._locked():
            if self.exists():
                m = self.read_manifest()
                if not self.holds_model(m, fingerprint):
                    raise LayerStoreError(f"store {self.path} holds layers of model {m['model_id']!r} "
                                          f"(fingerprint {m['model_fingerprint']}), not of {model_id!r}")
                if m["dsla_config"] != cfg:
                    raise LayerStoreError(f"store {self.path} was distilled with DSLA config "
                                          f"{m['dsla_config']}, not {cfg}")
                if [int(x) for x in m["order"]] != [int(x) for x in order]:
                    raise LayerStoreError(f"store {self.path} converts layers in the order {m['order']}, "
                                          f"not {list(order)}")
                return m
            # store_id: readers holding layers of an earlier store at this path (wiped and distilled
            # again, its versions counting from 1 anew) tell it from this one
            m = {"format": FORMAT, "model_id": model_id, "model_fingerprint": fingerprint, "store_id": uuid.uuid4().hex,
                 "order": list(order), "dsla_config": cfg, "version": 0, "layers": {}}
            _atomic_write(self.path / MANIFEST, json.dumps(m, indent=1).encode())
            return m

    @contextlib.contextmanager
    def writer(self):
        """Held by a distiller for its whole run: a second writer (the CLI beside the app's worker, two
        apps on one store) would distil the same layers, and the store could end up holding a layer
        trained over a predecessor that the other writer's publish replaced."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".writer", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LayerStoreError(f"store {self.path} is being distilled by another writer") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def publish(self, layer: int, state_dict: dict, metrics: dict, store_id: str | None = None) -> dict:
        """Write one layer atomically and return its manifest entry. `store_id`: the store the writer
        was built for (init's manifest); a store wiped and initialised again since then is refused,
        since its config or order may differ from what the layer was trained for."""
        with self._locked():
            m = self.read_manifest()
            if store_id is not None and m.get("store_id") != store_id:
                raise LayerStoreError(f"store {self.path} was initialised again since this writer started "
                                      f"(store id {m.get('store_id')}, not {store_id}): layer {layer} not published")
            if layer not in m["order"]:  # its position would be made up, and could repeat a real one
                raise LayerStoreError(f"layer {layer} is not in this store's order {m['order']}")
            old = m["layers"].get(str(layer))
            version = (old["version"] + 1) if old else 1
            name = f"layer_{layer:03d}.v{version}.safetensors"
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
            tmp = self.path / f".{name}.tmp{os.getpid()}"
            save_file(tensors, str(tmp), metadata={"model_fingerprint": m["model_fingerprint"],
                                                   "layer": str(layer)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            # safetensors writes 0600: replicas running as another user (a shared store) could not read it
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path / name)
            _sync_dir(self.path)  # the file's name is durable before the manifest names it
            order = m["order"]
            entry = {"position": order.index(layer),
                     "version": version, "metrics": metrics, "sha256": _sha256(self.path / name),
                     "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "file": name}
            m["layers"][str(layer)] = entry
            m["version"] = int(m["version"]) + 1
            _atomic_write(self.path / MANIFEST, json.dumps(m, indent=1).encode())
            if old and old["file"] != name:
                # the previous version stays until now so that readers of the old manifest finish
                with contextlib.suppress(FileNotFoundError):
                    (self.path / old["file"]).unlink()
            return entry

    def remove_stale_temporaries(self):
        """Temporary files of a writer that died mid-publish (never referenced by the manifest)."""
        with self._locked():
            for p in self.path.glob(".*.tmp*"):
                p.unlink(missing_ok=True)


# The store distilled for the default model ships in the repository's `layers/`.
SHIPPED_STORE = Path(__file__).resolve().parent.parent / "layers"


def shipped_store(fingerprint: str) -> Path | None:
    """The repository's shipped store if it was distilled for the model with `fingerprint`."""
    store = LayerStore(SHIPPED_STORE)
    try:
        if store.exists() and store.read_manifest()["model_fingerprint"] == fingerprint:
            return SHIPPED_STORE
    except LayerStoreError:
        pass
    return None
