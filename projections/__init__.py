"""DuckDB projections of the event log: tables rebuilt at will from the stream."""
