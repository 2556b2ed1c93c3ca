"""Flight recorder: what happened to the device and its mappings, when, exported for people.

``FlightRecorder`` keeps the last N events (vhost-user requests with their
duration, life-cycle steps, mapping changes, reset_map) in a ring buffer;
``chrome_trace`` turns them into Chrome trace event JSON (opens in Perfetto's
UI and chrome://tracing), ``sequence_diagram`` into a Mermaid sequence diagram.
"""

from .chrome_trace import chrome_trace, merge_chrome_traces
from .flight_recorder import Event, FlightRecorder
from .sequence_diagram import mermaid_sequence

__all__ = ["Event", "FlightRecorder", "chrome_trace", "merge_chrome_traces", "mermaid_sequence"]
