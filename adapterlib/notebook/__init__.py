"""Floor 8, what only a person watching uses: the live plot and a run's status (`monitor`), the gate slider
(`slider`)."""
