"""knowpatch: edit what a causal LM knows, keep each edit as a removable patch, prove it."""

__version__ = "0.1.0"

from .editor import Editor  # noqa: E402
from .errors import KnowpatchError  # noqa: E402
from .models import load_model  # noqa: E402
from .patches import Patch, PatchStore  # noqa: E402
from .requests import EditRequest, LocalityProbe, PortabilityProbe  # noqa: E402

__all__ = ["Editor", "EditRequest", "KnowpatchError", "LocalityProbe", "Patch", "PatchStore",
           "PortabilityProbe", "load_model", "__version__"]
