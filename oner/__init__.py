"""OneR: one transformer and one projection head for images, texts and image+text."""
