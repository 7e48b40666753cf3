"""Process roles: the supervisor (`strata serve`), ingest workers and the core."""
