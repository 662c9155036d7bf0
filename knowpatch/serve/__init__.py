"""`knowpatch serve`: an OpenAI-compatible HTTP API (`app`) over an `Engine` (`engine`) that
generates with per-row patches; knowpatch's own engine is `engines.local.LocalEngine`.

    app = create_app(Editor.from_pretrained(), ServeSettings(api_key="secret"))
"""

from .app import ServeSettings, create_app
from .engine import Engine, Generation
from .engines.local import LocalEngine
from .thread import InThread

__all__ = ["Engine", "Generation", "InThread", "LocalEngine", "ServeSettings", "create_app"]
