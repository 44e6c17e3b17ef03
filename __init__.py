"""llm-lifecycle: a language model's whole life in one command, every stage an MLflow run."""

__version__ = "0.1.0"
