"""`cinedit demo`: the whole two-stage pipeline on the bundled sample data (`run`), its plan (`plan`), the tokenizer
part (`tokenizer`) and `report.md` (`report`). With `cinedit/cli.py`, the only modules that import every subsystem.
"""

from cinedit.demo.run import main

__all__ = ["main"]
