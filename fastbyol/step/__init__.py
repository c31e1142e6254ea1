"""The math of one BYOL step: loss, LARS, schedules, EMA, and the step itself."""
