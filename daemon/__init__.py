"""The diffusiond server process: queue, worker and the image engine."""
