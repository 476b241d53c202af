"""``python -m cnnkit`` runs the CLI (also what ``torchrun -m cnnkit`` runs)."""

from cnnkit.cli.main import main

raise SystemExit(main())
