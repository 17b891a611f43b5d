"""Layer 4, other formats: MixLoRA adapters, peft LoRA upcycling, Mixtral export. Imports the layers below
(not `moetune.train`)."""
