"""OpenAI's Batch API on the online engines: files, batches, and the workers that run them."""

from app.batches.requests import ENDPOINTS, read_requests
from app.batches.store import BatchStore
from app.batches.worker import BatchWorker

__all__ = ["ENDPOINTS", "BatchStore", "BatchWorker", "read_requests"]
