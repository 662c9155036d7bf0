"""The `knowpatch` command: edit a model's facts, keep each edit as a patch, prove it worked.

Every command takes --model, --device and --dtype; editing commands take --config FILE.yaml
and trailing key=value overrides of the method's settings (`lr=1e-3 rank=4 seed=1`). Each
command parses its options, builds the library's settings, makes one library call and prints.
One module per group of commands: `demo`, `edit` (edit, eval, generate), `serve`, `bench`
(bench, compare, bench-router, calibrate, bench-serve), `patches` (list, show, route, merge,
rm); `common` holds what they share.
"""

from . import bench, demo, edit, patches, serve  # noqa: F401 - each registers its commands
from .common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
