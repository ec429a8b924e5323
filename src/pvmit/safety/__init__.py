"""Safety: the exhaustive promise check, fuzzing helpers, and the hostile guest."""
