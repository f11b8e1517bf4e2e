"""The HTTP layer: parse, validate, hand to the engine, serialise. No model work here."""
