"""The file MLflow logs with every registered model (MLflow's models-from-code): loading a
registered version runs this file, which takes the model class from the installed package,
so nothing is unpickled. It holds no logic of its own, so models logged by an older version
of the package run with today's code."""

import mlflow.models

from llm_lifecycle.models.pyfunc import TextGenerationModel

mlflow.models.set_model(TextGenerationModel())
