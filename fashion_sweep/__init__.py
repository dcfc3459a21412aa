"""fashion-sweep: learning-rate sweeps of a Keras CNN on Fashion-MNIST, configured by Hydra, tracked in MLflow."""

import os

# MLflow 3 sends usage telemetry on import unless told not to; a local research tool should not phone home.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# TensorFlow's C++ start-up chatter (no CUDA drivers, oneDNN notes) buries the run's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# MLflow 3.17 prints "View run ... at: <server URL>" for every run that ends through a server; the sweep prints
# where to browse once, and a job's own lines (progress) should not drown in these.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
