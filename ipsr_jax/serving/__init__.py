"""Trained models as functions: batched inference, jax.export and ONNX export."""
