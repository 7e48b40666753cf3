"""How the lake's parts join ``strata serve``'s core process.

``register_lake(pipeline)`` adds two pipeline components:

* ``archiver``: strata.lake.archiver.Archiver (``run`` drains on stop,
  ``status`` reports ``lag_events``);
* ``lake_scheduler``: the nightly batch and the retention policy
  (strata.lake.scheduler), holding the shared ``BatchJob``.

The admin routes (strata.lake.api) reach them through ``pipeline.components``.
"""

from __future__ import annotations

from typing import Any

from strata.lake.archiver import Archiver
from strata.lake.base import Lake
from strata.lake.batch import BatchJob
from strata.lake.scheduler import LakeScheduler
from strata.masking import DeletedUsers


def register_lake(pipeline: Any) -> None:
    config = pipeline.config
    lake = Lake.open(config)
    deleted_users = DeletedUsers(config.data_path)
    job = BatchJob(config, pipeline.store, lake, deleted_users=deleted_users, log_=pipeline.log)
    if hasattr(pipeline, "on_revised"):
        job.on_revised = pipeline.on_revised
    pipeline.components["archiver"] = Archiver.from_config(config, pipeline.log, lake)
    pipeline.components["lake_scheduler"] = LakeScheduler(config, job, lake, pipeline.log)
