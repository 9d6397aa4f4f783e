"""Moved to corral/ops/followup.py (issue 16 §1: the operations sit below the client); kept for imports."""

from corral.ops.followup import (
    AIDER_HISTORY as AIDER_HISTORY,
)
from corral.ops.followup import (
    SESSIONLESS as SESSIONLESS,
)
from corral.ops.followup import (
    ForkPlan as ForkPlan,
)
from corral.ops.followup import (
    Parent as Parent,
)
from corral.ops.followup import (
    check_budget_support as check_budget_support,
)
from corral.ops.followup import (
    find_parent as find_parent,
)
from corral.ops.followup import (
    plan_fork as plan_fork,
)
from corral.ops.followup import (
    recorded_session as recorded_session,
)
