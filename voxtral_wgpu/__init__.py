"""voxtral_wgpu: streaming speech recognition with Voxtral Mini 4B Realtime, every op a WGSL shader.

    import voxtral_wgpu
    model = voxtral_wgpu.load("path/to/Voxtral-Mini-4B-Realtime-2602")
    print(model.transcribe("speech.wav").text)
"""

from .api import DEFAULT_REPO, Model, Transcription, load
from .engine import Engine

__all__ = ["load", "Model", "Transcription", "DEFAULT_REPO", "Engine"]
__version__ = "0.1.0"
