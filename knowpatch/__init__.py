"""knowpatch: edit what a causal LM knows, keep each edit as a removable patch, prove it."""

from .editor import Editor
from .errors import KnowpatchError
from .models import load_model
from .patches import Patch, PatchStore
from .requests import EditRequest, LocalityProbe, PortabilityProbe
from .version import __version__

__all__ = ["Editor", "EditRequest", "KnowpatchError", "LocalityProbe", "Patch", "PatchStore",
           "PortabilityProbe", "load_model", "__version__"]
