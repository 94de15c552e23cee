"""A replica's view of the layer store: verified layer weights, loaded ahead of need.

Replicas poll the store and read every newly published (or republished) layer as
soon as it appears, checking its sha256 and the model fingerprint, so that a
later conversion only builds a small module from weights already in memory: the
swap never waits on disk, and a corrupt file is found long before it is needed
(and then skipped, never served).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Optional

log = logging.getLogger("ray.serve")

# A layer that failed to load (a read error, a file caught mid-copy) is tried again after this
# long even if nothing new is published; a bad file is then logged once, not at every poll.
RETRY_S = 30.0


class PreloadedLayers:
    def __init__(self, store_path: Optional[str], fingerprint: Optional[str] = None):
        self.store = None
        if store_path:
            from dsla_model.layer_store import LayerStore

            self.store = LayerStore(store_path)
        # the teacher's fingerprint; set once the model is built (it needs our dsla_config first)
        self.fingerprint = fingerprint
        self.weights: dict[int, dict] = {}
        # layer -> (version, sha256) of the weights held: a store wiped and distilled again numbers
        # its layers from 1 again, so the version alone would not tell new weights from old
        self.versions: dict[int, tuple] = {}
        self.order: list[int] = []  # loaded layers, in the store's order
        # the store's order up to its first layer not loaded: each layer was distilled with the ones
        # before it converted, so only a prefix may be converted (the controller's rule too)
        self.prefix: list[int] = []
        self.store_version = 0
        self._seen = None  # the manifest's (version, layer identities) at the last refresh
        self._store_id = None  # the manifest's store_id (None for stores written before it existed)
        self._settings = None  # its dsla_config, read with it (refresh runs every poll)
        self.errors: dict[int, str] = {}
        self._retry_at = 0.0  # monotonic time of the next retry of the layers in errors
        self._lock = threading.Lock()  # refresh runs in a worker thread

    def dsla_config(self):
        from dsla_model.dsla_attention import DSLAConfig

        if self._settings is not None:
            return DSLAConfig.from_dict(self._settings)
        if self.store is not None and self.store.exists():
            return self.store.dsla_config()
        return DSLAConfig()

    def refresh(self) -> list[int]:
        """Load what was published since the last call; returns the layers (re)loaded."""
        if self.store is None or not self.store.exists():
            return []
        if self.fingerprint is None:  # never load layers unchecked against the model
            raise RuntimeError("PreloadedLayers.fingerprint must be set before refresh()")
        from dsla_model.layer_store import LayerStoreError

        with self._lock:
            try:
                manifest = self.store.read_manifest()
            except (LayerStoreError, OSError) as e:  # mid-rewrite on a filesystem without atomic rename
                log.warning("layer store unreadable for now: %s", e)
                return []
            self._settings = manifest.get("dsla_config")
            retry = bool(self.errors) and time.monotonic() >= self._retry_at
            seen = (manifest["version"], sorted((k, e["version"], e["sha256"]) for k, e in manifest["layers"].items()))
            if seen == self._seen and not retry:
                return []
            entries = sorted(manifest["layers"].items(), key=lambda kv: kv[1]["position"])
            if manifest.get("store_id") != self._store_id:  # another store at this path: nothing held is its
                self.weights.clear()
                self.versions.clear()
                self.errors.clear()
                self._store_id = manifest.get("store_id")
            present = {int(k) for k in manifest["layers"]}
            for gone in set(self.weights) - present:  # a store wiped and started again
                del self.weights[gone], self.versions[gone]
            self.errors = {i: e for i, e in self.errors.items() if i in present}
            loaded = []
            for key, entry in entries:
                layer = int(key)
                ident = (entry["version"], entry["sha256"])
                if self.versions.get(layer) == ident:
                    continue
                try:
                    # the version read, not the one this manifest named: a republish in between
                    self.weights[layer], read = self.store.load_layer_entry(layer, self.fingerprint)
                except (LayerStoreError, OSError) as e:
                    if self.errors.get(layer) != str(e):
                        log.error("layer %d not loaded (retried every %.0f s): %s", layer, RETRY_S, e)
                    self.errors[layer] = str(e)
                    continue
                self.versions[layer] = (read["version"], read["sha256"])
                self.errors.pop(layer, None)
                loaded.append(layer)
            self.order = [int(k) for k, _ in entries if int(k) in self.weights]
            self.prefix = list(itertools.takewhile(self.weights.__contains__, (int(k) for k, _ in entries)))
            self.store_version = int(manifest["version"])
            self._seen = seen
            self._retry_at = time.monotonic() + RETRY_S
        if loaded:
            log.info("preloaded layers %s (store version %d)", loaded, self.store_version)
        return loaded

    def weights_for(self, layers, installed: dict[int, int]) -> dict[int, dict]:
        """Weights of the layers whose installed module is missing or older than what we hold."""
        return {i: w for i, (w, _) in self.take(layers, installed).items()}

    def take(self, layers, installed: dict[int, int]) -> dict[int, tuple[dict, tuple]]:
        """weights_for's layers as (weights, their (version, sha256)), read together: a refresh on
        another thread may replace both between two reads, and a swap must record what it installed."""
        with self._lock:
            return self._take(layers, installed)

    def _take(self, layers, installed: dict[int, int]) -> dict[int, tuple[dict, tuple]]:  # under self._lock
        return {i: (self.weights[i], self.versions[i]) for i in layers
                if i in self.weights and installed.get(i) != self.versions[i]}

    def take_usable(self, wanted, installed: dict[int, int]) -> tuple[list[int], dict, int]:
        """usable(wanted), take() of those layers and the store version, read under one lock: a refresh
        between two reads could drop a layer after it was counted usable (the swap would then convert it
        without weights: a fresh module), or report a store version newer than what was taken."""
        with self._lock:
            layers = list(itertools.takewhile(self.weights.__contains__, wanted))
            return layers, self._take(layers, installed), self.store_version

    def usable(self, layers) -> list[int]:
        """The leading run of `layers` (a prefix of the store's order) this replica holds: each
        layer was distilled with the ones before it converted, so a layer past a missing one
        would run in a configuration it was never trained for."""
        return self.take_usable(layers, {})[0]
