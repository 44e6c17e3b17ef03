"""The MLflow pyfunc flavour of our models: `predict(["prompt", ...])` returns generated text."""

from __future__ import annotations

import mlflow.pyfunc


class TextGenerationModel(mlflow.pyfunc.PythonModel):
    """Greedy (or sampled, via params) continuation of each prompt.

    `predict`'s type hints are its contract with MLflow: they make the logged signature (a
    list of strings in, a list of strings out), and MLflow checks and converts what callers
    pass (a one-column DataFrame from `mlflow models serve` becomes the list) before
    `predict` runs."""

    def load_context(self, context) -> None:
        from llm_lifecycle.models.load import load_model

        self.model, self.tokenizer = load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        import torch

        from llm_lifecycle.models.generate import generate

        params = params or {}
        prompts = [self.tokenizer.encode(p).ids for p in model_input]
        stop = [i for i in (self.tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>")) if i is not None]
        with torch.no_grad():
            outputs = generate(
                self.model,
                prompts,
                max_new_tokens=int(params.get("max_new_tokens", 32)),
                temperature=float(params.get("temperature", 0.0)),
                top_p=float(params.get("top_p", 1.0)),
                stop_ids=stop,
            )
        return [self.tokenizer.decode(ids) for ids in outputs]
