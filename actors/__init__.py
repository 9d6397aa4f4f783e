"""Corral's actors: independent processes or tasks that talk only through JetStream subjects."""
