"""Floor 7, other tools' formats: the diffusers pipeline (`pipeline`) and the exported adapter folder (`export`)."""
