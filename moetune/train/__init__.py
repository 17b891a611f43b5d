"""Layer 4, training: the Trainer mixin, its callbacks, complete checkpoints, DPO. Imports the layers below
(not `moetune.interop`)."""
