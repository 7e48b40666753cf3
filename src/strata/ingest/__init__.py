"""Ingest: HTTP in, durable log append out. Nothing else writes the log."""
