"""`python -m s4bt_hf.cli` runs the `s4bt` command (as `accelerate launch -m s4bt_hf.cli` needs)."""

from .commands import main

raise SystemExit(main())
