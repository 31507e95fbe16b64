"""Start the web app: the same as ``xraygpt serve`` (also the Hugging Face Space entry point).

Options are those of ``xraygpt serve --help``; on a Space, set XRAYGPT_CONFIG (and XRAYGPT_AUTH)
as variables/secrets instead. Research and education only: nothing the app says is a diagnosis.
"""

import sys

from xraygpt_app.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
