"""Names the engine imports from here since before the store was split by concern; their homes are
aetr.store.requests (an event's requests) and aetr.store.errors. New code imports from those."""

from __future__ import annotations

from aetr.store.errors import Conflict, Duplicate, NeedsScripts, Unavailable, is_outage_sqlstate
from aetr.store.requests import (
    Apply,
    Chain,
    Claim,
    ClaimedWork,
    ClaimResult,
    CountChild,
    FindRunByKey,
    FinishCall,
    FinishCalls,
    InsertRun,
    Lease,
    LoadChain,
    LoadTree,
    NextWaiting,
    PendingCall,
    Postpone,
    Program,
    RenewLease,
    WorkDue,
    single,
)

__all__ = [
    "Apply",
    "Chain",
    "Claim",
    "ClaimResult",
    "ClaimedWork",
    "Conflict",
    "CountChild",
    "Duplicate",
    "FindRunByKey",
    "FinishCall",
    "FinishCalls",
    "InsertRun",
    "Lease",
    "LoadChain",
    "LoadTree",
    "NeedsScripts",
    "NextWaiting",
    "PendingCall",
    "Postpone",
    "Program",
    "RenewLease",
    "Unavailable",
    "WorkDue",
    "is_outage_sqlstate",
    "single",
]
