"""Live traffic recorded as a lab trace (`capture` in the config, `GET /capture`,
`vrstack capture`): `recorder` in each ingress replica, `store` for the whole application."""

from app.capture.recorder import CAPTURED, Recorder, timed_lines
from app.capture.store import CaptureStore, store_name

__all__ = ["CAPTURED", "CaptureStore", "Recorder", "store_name", "timed_lines"]
