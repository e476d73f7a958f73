"""Training: TRL builders, multi-process launch, the training-time defences."""
