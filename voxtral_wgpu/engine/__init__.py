"""Many live streams on one GPU: the engine, its scheduler and the batched decoder step.

``Engine(model)`` owns the GPU work of every stream created from it: a scheduler thread runs ticks
in which each stream's newly complete positions go through the encoder and every stream with a
runnable position gets one row of a batched decoder step (``batch.DecodeBatch``), so the decoder's
weights are read once per step for all streams. Each stream's token ids equal what the same audio
and delay give alone through ``Model.transcribe()``, bit for bit: every kernel computes a row the
same way whatever else shares the dispatch. ``core`` holds the engine and its scheduler,
``stream`` the streams users hold, ``batch`` the batched step.
"""

from .core import Engine, EngineError, EngineFullError
from .stream import EngineStream

__all__ = ["Engine", "EngineError", "EngineFullError", "EngineStream"]
