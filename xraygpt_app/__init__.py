"""xraygpt-app: XrayGPT-style chest radiograph assistant built from the field's libraries.

Research and education only: nothing this package produces is a diagnosis.
"""

__version__ = "0.1.0"
