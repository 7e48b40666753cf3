"""The stream processor: event-time windows from the log to the serving
store and the ``window_results`` / ``late`` topics. See ``engine`` for the
semantics and ``runner`` for exactly-once."""
