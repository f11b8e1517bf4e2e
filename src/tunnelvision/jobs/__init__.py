"""Batch jobs: many images, stored on disk (SQLite + files), run at background priority,
resumed after a restart without redoing finished images."""
