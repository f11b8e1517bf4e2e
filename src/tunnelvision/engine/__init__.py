"""The engine: image work in a CPU pool, model work on one worker per device. No HTTP here."""
