"""Read the event log back: histories of executions, and (later) replay and fork from them."""
