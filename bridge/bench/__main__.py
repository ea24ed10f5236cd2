"""`python -m bridge.bench` is `sdbridge bench --json`. The command line lives in `bridge.cli`
(the only module that prints or exits); this entry only forwards to it, so that `bridge.bench`
itself never imports the CLI."""

from __future__ import annotations

import sys

from bridge.cli import main

raise SystemExit(main(["bench", "--json", *sys.argv[1:]]))
