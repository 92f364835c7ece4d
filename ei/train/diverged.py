"""The error a stage raises when its loss stops being finite: its own module, free of torch,
so that the command line can catch it without importing the training loop."""


class TrainingDiverged(RuntimeError):
    """The loss stopped being a finite number: every step after would train on nan."""
