"""Label Studio's ML backend protocol: labeling configs, result items, brush RLE, task images.

The pure parts live here; api/routes/label_studio.py speaks HTTP and calls the engine.
"""
