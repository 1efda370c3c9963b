"""What is fed to the model: images (:mod:`.images`) and image / transformed-image pairs with their
chance partners and the maps read back (:mod:`.pairs`)."""
