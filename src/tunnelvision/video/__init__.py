"""Video clips: decoding with limits (decode.py), exports (export.py), synthetic clips for tests."""
