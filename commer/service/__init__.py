"""The HTTP service: ``create_app`` builds the FastAPI app, ``ModelWorker`` batches the model work."""
