"""The fine-tuning application built on the engine: the ``peftkern`` command line (cli), GLUE data
(glue), the training loop (train), its checkpoints, distributed runs, finite-value monitor, reports,
and the transformers.Trainer callback. Nothing in the engine imports from here."""
