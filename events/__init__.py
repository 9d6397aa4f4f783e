"""Corral's event vocabulary: the envelope, the closed set of event types, subjects, codec and publisher.

Import from the submodules (events.envelope, events.types, ...): this package stays empty so a
light process (the per-execution shim) can use events.ids without loading pydantic.
"""
