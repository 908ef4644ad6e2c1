"""Internal helpers shared by every layer (not public API): validation, batching, model running,
the result protocol, summary statistics, seeded randomness and matplotlib setup."""
