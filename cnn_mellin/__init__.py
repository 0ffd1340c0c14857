"""cnn-mellin: hyperparameter search for CTC acoustic models on shared Optuna studies."""

__version__ = "0.1.0"
