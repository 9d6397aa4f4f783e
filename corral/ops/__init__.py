"""The operations' implementations (issue 16 §1): faces → corral.client → corral.ops → bus / DuckDB.

One module per area (base, submit, control, changes, approvals, history, worktrees, followup). They
import only events/, projections/, replay/, actors/ and the lower corral modules (config, home,
system, errors, ...), never a CLI or rendering module (tests/test_layering.py checks it).
"""
