"""Tenants' admission: the fair queue in front of each model (pure Python, no Ray or FastAPI),
and an asyncio gate over it (`gate`)."""

from app.tenants.fair_queue import Dropped, FairQueue, Rejected, Ticket
from app.tenants.gate import AdmissionGate, QueueFull, Slot, WaitExpired
from app.tenants.preemption import Holder, victim

__all__ = [
    "AdmissionGate",
    "Dropped",
    "FairQueue",
    "Holder",
    "QueueFull",
    "Rejected",
    "Slot",
    "Ticket",
    "WaitExpired",
    "victim",
]
