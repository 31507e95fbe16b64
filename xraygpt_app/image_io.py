"""Old home of the radiograph loader, kept for one release: use ``xraygpt_app.imaging`` (or the package root)."""

from .imaging.loader import *  # noqa: F403
from .imaging.loader import load_radiograph  # noqa: F401
