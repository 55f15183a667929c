"""``caltech serve``: a trained model behind a local HTTP API and a page to try it on.

``classifier`` turns images into probabilities exactly as ``caltech predict`` does (a checkpoint,
or an exported ONNX file); ``batching`` runs the images of requests that arrive together in one
call; ``app`` is the FastAPI application (the API, its limits, the page); ``command`` parses the
options and runs it with uvicorn.
"""
