"""The operations' implementations (issue 16 §1): faces → corral.client → corral.ops → bus / DuckDB.

One module per area (base, submit, control, changes and workspace, approvals, history, worktrees,
followup; shadow_view for a shadow workspace). They import only events/, projections/, replay/,
actors/ and the lower corral modules (config, home, system, errors, rows, ...), never the client, a
CLI or rendering module (tests/test_layering.py checks it).
"""
