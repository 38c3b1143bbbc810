"""Training: the generator trainer, the embedder pretraining, the losses and the ahead-of-time compile of the step."""
