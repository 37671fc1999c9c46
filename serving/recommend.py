"""The recommender each ingress replica holds: the catalog as arrays and the merged
item signals, refreshed in the background.

The catalog is loaded from the store and reloaded on an interval; trending and
the co-engagement graph are pulled from every shard on a shorter interval, and on
the same interval the model log is read: when another model version serves (a
training job published it, or `persona model switch|rollback`), its item
embeddings are loaded and ranking uses them from the next request, no restart. It
lives inside the ingress replica rather than in a deployment of its own: ranking
takes ~0.3 ms, a Serve hop to another replica costs several times that (see
README, "Design changes").
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid

from actors import item_model
from actors.attribution import Exposure
from actors.catalog import decode_item
from actors.fleet import Fleet
from actors.item_stats import merge_snapshots
from actors.profile import ProfileView
from persona.settings import Settings
from serving import experiments
from serving.exposures import ExposureLog
from serving.ranking import Catalog, Seeds, Signals, recommend
from storage import Store, open_store

log = logging.getLogger(__name__)


class RecommenderCore:
    """Everything but the Serve wrapper: usable from jobs (evaluate) and tests."""

    def __init__(self, settings: Settings, fleet: Fleet | None = None, store: Store | None = None):
        self.settings = settings
        self.store = store or open_store(settings=settings)
        self.fleet = fleet
        self.catalog = Catalog()
        self.signals = Signals()
        self.catalog_loaded_at = 0.0
        self.signals_loaded_at = 0.0
        self.model: item_model.ItemEmbeddings | None = None
        self.seeds = Seeds.from_settings(settings)
        # PERSONA_EXPERIMENTS until the store's experiment log is read (load_experiment).
        self.experiment = experiments.from_settings(settings.experiments)
        # Exposures of the responses, when this core serves an API (the Ingress).
        self.exposures: ExposureLog | None = None

    def load_catalog(self) -> int:
        records = (decode_item(i, blob) for i, blob in self.store.scan_items())
        catalog = Catalog.from_records(records)
        if self.model is not None:
            catalog = catalog.with_model(self.model.version, self.model.ids, self.model.vectors)
        self.catalog = catalog
        self.signals = Signals.build(self.signals.merged, self.catalog)
        self.catalog_loaded_at = time.monotonic()
        return len(self.catalog)

    def load_model(self) -> str | None:
        """Read the model log; load the serving version's embeddings if they are not
        the ones held. Returns the version ranking uses now (None: no model yet)."""
        loaded = self.model.version if self.model is not None else None
        model = item_model.load_current(self.store, loaded)
        if model is not None:
            self.model = model
            self.catalog = self.catalog.with_model(model.version, model.ids, model.vectors)
        return self.model.version if self.model is not None else None

    def load_experiment(self) -> experiments.Experiment:
        """Read the experiment log: the running experiment serves from the next
        request (a change takes effect without a restart)."""
        self.experiment, _log = experiments.current(self.store, self.settings.experiments)
        return self.experiment

    async def flush_exposures(self) -> int:
        if self.exposures is None:
            return 0
        return await self.exposures.flush(
            self.store, self.fleet, self.settings.exposure_retention_s
        )

    async def keep_logging(self) -> None:
        """Flush exposures on their interval, forever (ExposureLog says how)."""
        while True:
            await asyncio.sleep(self.settings.exposure_flush_s)
            try:
                await self.flush_exposures()
            except Exception:
                log.exception("exposure flush failed")

    async def load_signals(self) -> None:
        if self.fleet is None:
            self.fleet = Fleet.connect(self.settings, self.store)
        else:
            # The shard set may have been scaled since the last pull.
            await self.fleet.refresh_async()
        # Replicas ask for the same instant within an interval, so a shard computes
        # one snapshot per interval however many replicas pull it.
        interval = self.settings.signals_refresh_s
        now = math.floor(time.time() / interval) * interval if interval > 0 else time.time()
        snapshots = await asyncio.gather(
            *(s.item_signals.remote(now) for s in self.fleet.shards.values())
        )
        # Merging and indexing take a while for a big catalog: off the event loop,
        # so that requests keep being answered meanwhile.
        catalog = self.catalog
        self.signals = await asyncio.to_thread(
            lambda: Signals.build(merge_snapshots(snapshots), catalog)
        )
        self.signals_loaded_at = time.monotonic()

    async def refresh_now(self) -> dict:
        """Reload catalog and signals immediately (after a catalog upload)."""
        items = await asyncio.to_thread(self.load_catalog)
        await asyncio.to_thread(self.load_model)
        await self.load_signals()
        return {"items": items, "trending": len(self.signals.trending)}

    async def keep_fresh(self) -> None:
        """Reload the catalog and pull signals on their intervals, forever; a failed
        refresh keeps serving the last good data."""
        settings = self.settings
        while True:
            try:
                if time.monotonic() - self.catalog_loaded_at >= settings.catalog_refresh_s:
                    await asyncio.to_thread(self.load_catalog)
                await asyncio.to_thread(self.load_model)
                await asyncio.to_thread(self.load_experiment)
                await self.load_signals()
            except Exception:
                log.exception("recommender refresh failed")
            await asyncio.sleep(settings.signals_refresh_s)

    def recommend(
        self,
        user_id: str,
        profile: ProfileView | None,
        k: int,
        topic: str | None,
        exclude_seen: bool,
    ) -> dict:
        experiment = self.experiment
        variant = experiment.assign(user_id)
        items = recommend(
            profile,
            self.catalog,
            self.signals,
            experiment.blend(variant),
            k=k,
            topic=topic,
            exclude_seen=exclude_seen,
            max_per_topic=self.settings.max_per_topic,
            seeds=self.seeds,
        )
        rec_id = uuid.uuid4().hex
        if self.exposures is not None:
            self.exposures.add(
                Exposure(
                    rec_id,
                    user_id,
                    time.time(),
                    experiment.name,
                    variant,
                    tuple(item["item_id"] for item in items),
                )
            )
        return {
            "user_id": user_id,
            "rec_id": rec_id,
            "experiment": experiment.name,
            "variant": variant,
            "cold_start": profile is None,
            "model": self.catalog.model_version or None,
            "items": items,
        }
